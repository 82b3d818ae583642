"""``rankscope formats``: every built-in family says what it needs and how its spectrum is computed."""

from __future__ import annotations

from click.testing import CliRunner

from rankscope.cli import main
from rankscope.formats import detection_order

# formats whose modules other engineers own this round (bora.py, composition.py, the new full_delta.py): their
# needs/spectrum are added by the lead (see /work/notes/readme/formats13.md); remove them from here then
PENDING: set[str] = set()


def test_every_built_in_format_states_needs_and_spectrum():
    built_in = [fmt for fmt in detection_order() if fmt.read.__module__.startswith("rankscope.formats.")]
    missing = {fmt.name for fmt in built_in if not (fmt.needs and fmt.spectrum)}
    assert missing <= PENDING, f"formats that do not say what they need: {sorted(missing - PENDING)}"
    for fmt in built_in:
        if fmt.name not in PENDING:
            assert fmt.needs.startswith(("nothing", "--base")), fmt.name
            assert any(word in fmt.spectrum for word in ("factored", "dense", "Kronecker", "vector")), fmt.name


def test_the_listing_gives_each_format_its_needs_and_spectrum():
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * len(detection_order())
    for fmt, (head, details) in zip(detection_order(), zip(lines[::2], lines[1::2], strict=True), strict=True):
        assert head.split()[0] == fmt.name and details.startswith(" " * 13 + "needs: ")
        if fmt.needs:
            assert details.strip() == f"needs: {fmt.needs}; spectrum: {fmt.spectrum}"
    kohya = lines[lines.index(next(line for line in lines if line.startswith("kohya "))) + 1]
    assert "--base for GLoRA, DoRA, (IA)³, OFT, BOFT" in kohya and "vector (norm)" in kohya
    assert "needs: --base and the peft extra (TinyLoRA, UniLoRA, FRoD: --base a model directory" in result.stdout
