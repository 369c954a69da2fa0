"""Every published benchmark section names the code that ran: the git revision (dirty flag included)."""
import json
import subprocess

from benchmarks import publish as pub


def test_sections_and_payloads_are_stamped_with_the_revision(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.delenv("VMONARCH_REVISION", raising=False)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pub.ROOT, capture_output=True,
                         text=True).stdout.strip()
    rev = pub.revision()
    assert sha and rev.split("+")[0] == sha and rev in (sha, sha + "+dirty")
    pub.publish("probe", "## A table (today)\n\n| a |\n|---|\n| 1 |\n", {"x": 1}, append=False)
    section = (tmp_path / "probe_section.md").read_text()
    assert section.startswith(f"## A table (today)\n\nRevision: `{rev}`.\n")
    assert json.loads((tmp_path / "probe.json").read_text()) == {"x": 1, "revision": rev}
    monkeypatch.setenv("VMONARCH_REVISION", "abc1234")  # a copy of the tree without git metadata
    assert pub.revision() == "abc1234"
