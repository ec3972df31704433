"""The warning that masks were still switching when training ended (Masks page, CLI)."""

from __future__ import annotations

from sams_core.io.bundle import mask_settling_note


def _history(on_counts: list[int], n_entries: int, phases: list[str] | None = None) -> list[dict]:
    phases = phases or ["final"] * len(on_counts)
    return [{"epoch": i + 1, "phase": p, "mask_frac_high": c / n_entries} for i, (c, p) in enumerate(zip(on_counts, phases))]


def test_masks_switching_on_in_the_final_phase_are_reported_with_their_counts_and_epochs():
    # 1,500 entries; pruning leaves 280 masks on, the final phase drifts up to 430
    counts = [900, 600, 300, 280] + [280 + 15 * i for i in range(11)]
    phases = ["warmup", "sparsify", "sparsify", "sparsify"] + ["final"] * 11
    note = mask_settling_note(_history(counts, 1500, phases), 1500)
    assert note is not None and "switching on" in note
    # the second half of the final phase: its 6th of 11 epochs (epoch 10, 355 on) to its last (epoch 15, 430 on)
    assert "355 masks at P ≥ 0.5 at epoch 10, 430 at epoch 15" in note and "final phase" in note


def test_masks_switching_off_are_reported_too():
    note = mask_settling_note(_history([400, 380, 350, 320, 300, 280], 1000), 1000)
    # a model without a schedule (one phase throughout): the second half of training
    assert note is not None and "switching off" in note and "second half of training" in note


def test_settled_masks_and_small_wobbles_give_no_warning():
    assert mask_settling_note(_history([200] * 10, 1500), 1500) is None
    # one mask up and down, and 4 % of 200 (below both the 2-mask and the 5 % floor)
    assert mask_settling_note(_history([200, 201, 200, 201, 200, 201], 1500), 1500) is None
    assert mask_settling_note(_history([200, 200, 200, 204, 206, 208], 1500), 1500) is None


def test_only_the_last_phase_counts():
    # the pruning phase dropped 1,000 masks; the final phase is flat: settled
    counts = [1200, 700, 200, 200, 200, 200, 200, 200]
    phases = ["warmup", "sparsify", "sparsify", "final", "final", "final", "final", "final"]
    assert mask_settling_note(_history(counts, 1500, phases), 1500) is None


def test_no_masks_gives_no_warning():
    no_masks = [{"epoch": i, "phase": "final", "mask_frac_high": None} for i in range(1, 10)]
    assert mask_settling_note(no_masks, 0) is None
    assert mask_settling_note(no_masks, 100) is None
    assert mask_settling_note([], 100) is None


def test_too_short_a_final_phase_is_said_to_be_too_short():
    """A run whose last phase had fewer than 4 epochs cannot show settled masks: the note says so,
    with the phase and its length, whether the masks moved or not."""
    phases = ["warmup"] * 3 + ["sparsify"] * 4 + ["final"] * 2
    for counts in ([40] * 9, [40] * 7 + [10, 90]):
        note = mask_settling_note(_history(counts, 100, phases), 100)
        assert note is not None and "too short" in note and "final phase had 2 epochs" in note
    note = mask_settling_note(_history([10, 50, 90], 100), 100)
    assert note is not None and "training had 3 epochs" in note
