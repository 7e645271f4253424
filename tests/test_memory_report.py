"""A generation says what it held at most: the CLI's last line carries the process's peak RSS."""

import re

from sdlab.cli import main
from sdlab.memory import peak_rss_bytes


def test_peak_rss_is_read_in_bytes():
    assert 10 * 2**20 < peak_rss_bytes() < 2**40  # a Python process with torch: tens of MiB at least, not a TiB


def test_generate_reports_its_peak_rss(tmp_path, capsys):
    assert main(["generate", "a red circle", "--model", "demo", "--steps", "1", "--size", "64x64", "--quiet",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert re.search(r"^seed \d+, [\d.]+s, peak RSS [\d.]+ (MiB|GiB)", capsys.readouterr().err, re.MULTILINE)
