"""docs/how-it-works.md stays in step with scripts/make_docs.sh: every picture the document shows exists,
and the script has the command that makes it. A cheap check on the text; it does not re-run the script."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "how-it-works.md"
SCRIPT = ROOT / "scripts" / "make_docs.sh"


def referenced_files() -> list[str]:
    """The files under how-it-works/ that the document links or shows, in order, each once."""
    names = re.findall(r"\]\((how-it-works/[^)\s]+)\)", DOCUMENT.read_text())
    return list(dict.fromkeys(names))


def script_commands() -> list[str]:
    """The script's commands, one string each: backslash continuations joined, comments dropped,
    and a python heredoc kept whole with its command line."""
    commands, current, heredoc_end = [], "", None
    for line in SCRIPT.read_text().splitlines():
        if heredoc_end is not None:
            current += "\n" + line
            if line.strip() == heredoc_end:
                commands.append(current)
                current, heredoc_end = "", None
            continue
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        heredoc = re.search(r"<<'(\w+)'", line)
        if heredoc:
            heredoc_end = heredoc.group(1)
        elif not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def makers_of(name: str) -> list[str]:
    """The sdlab or Python commands of the script that write `$OUT/<name>`."""
    target = f'"$OUT/{name}"'
    return [command for command in script_commands()
            if target in command and re.search(r'(^|\s)(sdlab|"\$PYTHON")\s', command)]


def test_the_document_shows_pictures():
    names = referenced_files()
    assert len([n for n in names if n.endswith(".png")]) >= 10


def test_every_referenced_file_exists():
    missing = [name for name in referenced_files() if not (ROOT / "docs" / name).is_file()]
    assert not missing, f"run scripts/make_docs.sh: missing {missing}"


def test_the_script_makes_every_referenced_file():
    unmade = [name for name in referenced_files() if not makers_of(name.removeprefix("how-it-works/"))]
    assert not unmade, f"scripts/make_docs.sh has no command writing {unmade}"


def test_the_pictures_stay_small():
    total = sum(path.stat().st_size for path in (ROOT / "docs" / "how-it-works").iterdir())
    assert total < 2_000_000


def test_the_quoted_command_output_is_the_scripts():
    """Text the document quotes from a command (a fenced block under a link to its .txt) is that file's text."""
    document = DOCUMENT.read_text()
    for name, quoted in re.findall(r"\]\((how-it-works/[^)]+\.txt)\)[^\n]*\n+```text\n(.*?)```", document, re.S):
        assert quoted == (ROOT / "docs" / name).read_text(), f"{name} changed: copy it into the document"
