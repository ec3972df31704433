"""The glossary explains every metric column a page or the command line shows."""

from sams_core.evaluation.glossary import ADDITIVE_BASELINE, column_help, metric_help
from sams_core.evaluation.metrics import SCORE_KEYS


def test_every_score_column_has_a_meaning():
    for key in (*SCORE_KEYS, "iwelbo", "energy_distance", "energy_floor", "mask_f1", "collapsed"):
        assert metric_help(key), key


def test_labels_and_prefixed_keys_find_the_same_sentence():
    assert metric_help("Calibration slope") == metric_help("calibration_slope")
    assert metric_help("test/ate_r_top20") == metric_help("ate_r_top20")
    assert metric_help("R²") == metric_help("ate_r2")
    assert "0.5" in metric_help("cosine rank")
    assert metric_help("not a metric") == ""
    assert metric_help("additive in data") == ADDITIVE_BASELINE
    assert "measured alone" in ADDITIVE_BASELINE
    assert set(column_help(["name", "iwelbo", "mask_f1"])) == {"iwelbo", "mask_f1"}
