"""The docs cannot go stale: every code block of README.md and docs/*.md runs or is checked here.

- ```python blocks are executed, per file in order, in one fresh namespace per file: a page's blocks build
  on each other as a reader runs them (README's mining example uses the `device` of its first block), with
  torch's global RNG seeded (0) before each page. They must run anywhere, so a block that would want a GPU
  picks it with `torch.device("cuda" if torch.cuda.is_available() else "cpu")`; none is exempt. The
  pytorch-metric-learning and sentence-transformers blocks run too (the sentence-transformers model is built
  in the block, a StaticEmbedding with random weights over a word-level tokenizer; nothing is downloaded).
- ```bash / ```sh / ```shell / ```console blocks (and inline `make ...`, `tripletloss-cuda ...`,
  `python ...`, `pytest ...`, `torchrun ...` spans of the prose) are checked, not run: each `make TARGET`
  is a target of the Makefile and `make -n TARGET VAR=...` succeeds; each `tripletloss-cuda CMD --flag`
  (or `python -m tripletloss_cuda`, `torchrun ... -m tripletloss_cuda`) names a command whose `--help`
  lists every flag given (`tripletloss-cuda info` itself runs: it is cheap); `python SCRIPT --flag` names
  an existing script whose source has each flag; `pytest PATH`, `bash SCRIPT`, `cd DIR` name existing
  paths; `pip install` installs `.`, an extra of setup.py or a wheel under dist/. A command this file does
  not know fails the test, so a new kind of command must be taught here. In ```console blocks only the
  `$ ` lines are commands.
- ```text blocks and blocks without a language (output, tables) are not run. Any other language fails.
- Every relative link (and image) points to an existing file, and an `#anchor` into a markdown file to
  one of its headings (GitHub's slugs). Every `tl.NAME...` / `tripletloss_cuda.NAME...` in backticks
  exists (an attribute walk, importing submodules), so do `torch.ops.tripletloss_cuda.OP`s when the
  extension is loaded, and every repository path in backticks (csrc/..., tests/..., tools/..., with
  globs and {a,b}).
- README.md stays a two-minute read (at most 200 lines) and links every page of docs/.
"""

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

import tripletloss_cuda
from tripletloss_cuda import _library, cli

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]
SHELL = {"bash", "sh", "shell", "console"}
SKIPPED = {"", "text"}
REPO_DIRS = {"csrc", "tripletloss_cuda", "tests", "tools", "benchmarks", "docs", ".ci"}
# Names the prose gives relative to the package (`distances.matrix`, `mining.ops.MEMORY_BUDGET_BYTES`).
SUBMODULES = ("_library", "distances", "gradcache", "indexed", "integrations", "mining", "ops", "reference")
FILE_SUFFIXES = {"py", "h", "cpp", "cu", "md", "json", "png", "sh", "so"}
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


def blocks(page):
    """[(language, code, first line number)] of the fenced blocks of a page, dedented by the fence's indent."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language, start, body = len(m.group(1)), m.group(2).lower(), i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        assert i < len(lines), f"{page.name}:{start}: unclosed code block"
        found.append((language, "\n".join(body) + "\n", start))
        i += 1
    return found


def prose(page):
    """The page without its fenced blocks (for links and inline code)."""
    out, inside = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line) or (inside and line.strip() == "```"):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return "\n".join(out)


def inline_code(page):
    """The `code spans` of the prose (a span may wrap onto the next line)."""
    return [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose(page))]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_python_blocks_run(page):
    code = [(code, line) for language, code, line in blocks(page) if language == "python"]
    namespace = {"__name__": "__docs__"}
    torch.manual_seed(0)  # each page's random examples are the same every run
    for source, line in code:
        # Line numbers of a traceback are the page's.
        exec(compile("\n" * line + source, str(page), "exec"), namespace)  # noqa: S102 (the docs are this repo's)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_languages_known(page):
    for language, _, line in blocks(page):
        assert language in {"python"} | SHELL | SKIPPED, f"{page.name}:{line}: a ```{language} block: run or skip it"


# Shell commands.

MAKEFILE = (ROOT / "Makefile").read_text()
# Under `make test` the parent make's flags (jobserver, -n of its own) must not reach the dry run.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
MAKE_TARGETS = set(re.findall(r"^([\w.-]+)\s*:(?!=)", MAKEFILE, re.MULTILINE))


def commands(code, console=False):
    """The command lines of a shell block, split into words (continuations joined, comments dropped), each with
    the --flags its comment names (a comment-only line continues the comment of the command above)."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        words = shlex.split(line, comments=True)
        comment = re.search(r"(?:^|\s)#(.*)$", line)
        flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", comment.group(1)) if comment else []
        if words:
            found.append((words, flags))
        elif found:
            found[-1][1].extend(flags)
    return found


def without_env(words):
    """The command without its leading VAR=value assignments."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return words


def is_placeholder(word):
    return word in ("...", "[...]") or "<" in word or word.isupper()


def check_make(args):
    targets = [a for a in args if "=" not in a and not a.startswith("-")]
    variables = [a for a in args if "=" in a and "<" not in a]
    for target in targets or ["setup"]:
        assert target in MAKE_TARGETS, f"make {target}: no such target in the Makefile"
        run = subprocess.run(
            ["make", "-n", target, *variables], check=False, cwd=ROOT, capture_output=True, text=True, env=MAKE_ENV
        )
        assert run.returncode == 0, f"make -n {target} {' '.join(variables)}: {run.stderr}"


_HELP = {}


def cli_help(argv):
    """The --help text of a command (and of bench --mining / --integrations), from the parser itself."""
    key = tuple(argv)
    if key not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            cli.main([*argv, "--help"])
        assert exited.value.code == 0, f"tripletloss-cuda {' '.join(argv)} --help exited {exited.value.code}"
        _HELP[key] = out.getvalue()
    return _HELP[key]


def check_cli(args):
    words = [a for a in args if not is_placeholder(a)]
    if not words:  # the program alone, or `python -m tripletloss_cuda ...`
        return
    command = words[0]
    assert command in cli.COMMANDS, f"tripletloss-cuda {command}: no such command"
    if words == ["info"]:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["info"]) == 0
        return
    routes = [a for a in words[1:] if command == "bench" and a in ("--mining", "--integrations")]
    help_text = cli_help([command, *routes[:1]])
    for flag in words[1:]:
        if flag.startswith("--") and flag not in routes:
            name = flag.split("=")[0]
            assert re.search(rf"{re.escape(name)}\b", help_text), f"tripletloss-cuda {' '.join(args)}: no {name}"


def check_path(word, what):
    assert (ROOT / word).exists(), f"{what}: {word} does not exist"


def check_python(args):
    if args[:2] == ["-m", "tripletloss_cuda"]:
        return check_cli(args[2:])
    if args[:2] == ["-m", "pytest"]:
        return check_pytest(args[2:])
    assert args and not args[0].startswith("-"), f"python {' '.join(args)}: not a command this test knows"
    check_path(args[0], "python")
    source = (ROOT / args[0]).read_text()
    for flag in args[1:]:
        if flag.startswith("--"):
            assert f'"{flag.split("=")[0]}"' in source, f"python {' '.join(args)}: {args[0]} has no {flag}"


def check_pytest(args):
    skip_next = False
    for word in args:
        if skip_next or word.startswith("-"):
            skip_next = word in ("-m", "-k", "-p")
            continue
        if not is_placeholder(word):
            check_path(word.split("::")[0], "pytest")


def check_pip(args):
    assert args[:1] == ["install"], f"pip {' '.join(args)}: not a command this test knows"
    setup = (ROOT / "setup.py").read_text()
    for word in args[1:]:
        if word.startswith("-"):
            continue
        m = re.fullmatch(r"\.(?:\[(\w+)\])?", word)
        if m:
            assert m.group(1) is None or f'"{m.group(1)}"' in setup, f"pip install {word}: no such extra"
        else:
            assert word.startswith("dist/") and word.endswith(".whl"), f"pip install {word}: not this package"


def check_command(words):
    words = without_env(words)
    program, args = words[0], words[1:]
    if program == "make":
        check_make(args)
    elif program == "tripletloss-cuda":
        check_cli(args)
    elif program in ("python", "python3") or program.endswith("/bin/python"):
        check_python(args)
    elif program == "pytest":
        check_pytest(args)
    elif program == "torchrun":
        assert "-m" in args, f"torchrun {' '.join(args)}: not a command this test knows"
        check_python(args[args.index("-m") :])
    elif program == "pip":
        check_pip(args)
    elif program in ("bash", "sh"):
        check_path(args[0], program)
    elif program == "cd":
        assert (ROOT / args[0]).is_dir(), f"cd {args[0]}: no such folder"
    elif "/" in program:
        check_path(program, "script")
    else:
        raise AssertionError(f"{program}: a command test_docs.py does not know (teach it)")


INLINE_COMMAND = re.compile(r"(?:[A-Z_]+=\S* )*(make|tripletloss-cuda|python3?|pytest|torchrun) ")


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_shell_commands(page):
    checked = 0
    for language, code, line in blocks(page):
        if language in SHELL:
            for words, comment_flags in commands(code, console=language == "console"):
                if without_env(words)[0] == "tripletloss-cuda":  # its comment's flags are its options
                    words = words + comment_flags
                try:
                    check_command(words)
                except AssertionError as err:
                    raise AssertionError(f"{page.name}, block at line {line}: {err}") from None
                checked += 1
    for span in inline_code(page):
        if INLINE_COMMAND.match(span + " "):
            try:
                check_command(shlex.split(span))
            except AssertionError as err:
                raise AssertionError(f"{page.name}, `{span}`: {err}") from None
            checked += 1
    if page.name == "README.md":
        assert checked >= 5  # the two commands, install, the command line


# Links, names and paths.


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), re.MULTILINE):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_links(page):
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: link {target}: no such heading in {file.name}"


def resolve(dotted):
    """The object a dotted name of the package names (tl. is tripletloss_cuda.), importing submodules."""
    parts = dotted.split(".")
    obj = tripletloss_cuda
    for part in parts[1:]:
        if not hasattr(obj, part) and isinstance(obj, type(tripletloss_cuda)):
            with contextlib.suppress(ModuleNotFoundError):
                importlib.import_module(f"{obj.__name__}.{part}")
        assert hasattr(obj, part), f"`{dotted}`: {part!r} not found"
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_names_exist(page):
    for span in inline_code(page):
        for name in re.findall(r"(?<![\w./])(?:tl|tripletloss_cuda)(?:\.\w+)+", span):
            resolve(name)
        for name in re.findall(rf"(?<![\w./])(?:{'|'.join(SUBMODULES)})(?:\.\w+)+", span):
            if name.rsplit(".", 1)[1] not in FILE_SUFFIXES:  # `mining.ops.MiningFunction`, not `ops.py`
                resolve(f"tl.{name}")
        for op in re.findall(r"torch\.ops\.tripletloss_cuda\.(\w+)", span):
            if _library.STATUS == "loaded":
                assert hasattr(torch.ops.tripletloss_cuda, op), f"`{span}`: no op {op}"


def expand(word):
    """{a,b} alternatives of a path."""
    m = re.search(r"\{([^{}]*)\}", word)
    if not m:
        return [word]
    return [w for alt in m.group(1).split(",") for w in expand(word[: m.start()] + alt + word[m.end() :])]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_paths_exist(page):
    for span in inline_code(page):
        for word in span.split():
            word = word.rstrip(".,;:)")
            if "/" not in word or word.split("/")[0] not in REPO_DIRS or not re.fullmatch(r"[\w.\-/*{},]+", word):
                continue
            for path in expand(word):
                found = list(ROOT.glob(path.rstrip("/"))) if "*" in path else [ROOT / path]
                assert found and all(p.exists() for p in found), f"{page.name}: `{span}`: {path} does not exist"


def test_readme_is_short_and_links_every_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in re.findall(r"\]\(([^)\s]+)\)", prose(readme))}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(ROOT)}"
    assert sum(language == "python" for language, _, _ in blocks(readme)) >= 4
