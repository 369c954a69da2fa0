"""CI must fail on a broken install, never skip: no test module skips for a missing package of
ours or of the [test] extra."""
import pathlib
import re


def test_no_test_skips_for_a_missing_package():
    here = pathlib.Path(__file__).parent
    pattern = re.compile(r"importorskip|pytest\.skip\(|mark\.skip|skipif")
    hits = [f"{p.name}:{i}" for p in sorted(here.glob("*.py")) if p.name != pathlib.Path(__file__).name
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
