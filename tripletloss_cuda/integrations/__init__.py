"""Drop-in losses for the libraries people train triplet losses with; one module per library.

    pml.py                     pytorch-metric-learning 2.9: TripletMarginLoss
    sentence_transformers.py   sentence-transformers 6: BatchHardTripletLoss, BatchHardSoftMarginTripletLoss,
                               BatchAllTripletLoss, BatchSemiHardTripletLoss

Neither library is imported by tripletloss_cuda itself: each module imports its library only where it needs
the library's classes.
"""
