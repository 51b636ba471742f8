"""Bootstrap intervals on known cases and the comparison table/plot."""
import numpy as np
import pytest

from avpt.methods_table import bootstrap_ci, comparison_html, comparison_plot, per_image

# The GPU tier leaves these out: not a device path (bootstrap intervals and report rendering).
pytestmark = pytest.mark.cpu_only


def _arrays(probs, labels, dice=None):
    n = len(labels)
    d = np.full(n, np.nan) if dice is None else np.asarray(dice, float)
    return dict(probs=np.asarray(probs, float), labels=np.asarray(labels), dice=d, iou=d.copy(),
                hd95=d.copy())


def test_perfect_separation_gives_degenerate_interval():
    labels = np.array([0, 1] * 30)
    ci = bootstrap_ci(_arrays(labels * 0.8 + 0.1, labels, np.full(60, 0.7)), n_resamples=200)
    assert ci["auc"] == (1.0, 1.0, 1.0) and ci["f1"] == (1.0, 1.0, 1.0)
    assert np.allclose(ci["dice"], 0.7)


def test_interval_covers_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 600):
        labels = rng.integers(0, 2, n)
        probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, n), 0, 1)
        est, lo, hi = bootstrap_ci(_arrays(probs, labels), keys=("auc",), n_resamples=300)["auc"]
        assert lo <= est <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_no_segmentation_head_is_nan_and_rendered_na(tmp_path):
    pred = dict(probs=np.array([0.2, 0.9, 0.4, 0.6]), labels=np.array([0, 1, 0, 1]), preds=None,
                gts=np.ones((4, 8, 8), bool))
    ci = bootstrap_ci(per_image(pred), n_resamples=50)
    assert np.isnan(ci["dice"][0])
    rows = [dict(method="linear probe", split="fold 0", n=4, metrics=ci, trainable_pct=0.05),
            dict(method="A-VPT", split="fold 0", n=4, metrics=ci, trainable_pct=12.5)]
    html = comparison_html(rows, "cap")
    assert html.count("<tr>") == 3 and "n/a" in html and "12.50%" in html and "1.87%" in html
    assert "<td>1.000" in html  # AUC estimate; 4 images: resamples of one class leave no interval
    assert comparison_plot(rows, str(tmp_path / "c.png")) and (tmp_path / "c.png").stat().st_size > 0


def test_display_names_are_the_methods_own():
    from avpt.demo import display_name
    from avpt.methods import get_method_class, method_names

    names = {m: display_name(m) for m in method_names()}
    assert names["cilmp"] == "CILMP" and names["biomedap"] == "BiomedAP" and names["avpt"] == "A-VPT"
    assert all(names[m] == get_method_class(m).display_name for m in names)
    assert len(set(names.values())) == len(names)   # one row label per method


def test_demo_table_has_cilmp_and_biomedap_rows(tmp_path, monkeypatch):
    """``avpt demo --methods cilmp biomedap`` on a tiny budget (5 patients a modality, 1 epoch;
    50 bootstrap resamples instead of 1000, which took 3/4 of the time): both methods train and
    evaluate on the fold and the MG->US transfer, and the comparison table names them by their
    display names."""
    import json
    import re

    from avpt import demo
    from avpt.cli import main

    ci = demo.C.bootstrap_ci
    monkeypatch.setattr(demo.C, "bootstrap_ci", lambda a, n_resamples, seed: ci(a, n_resamples=50,
                                                                                  seed=seed))

    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--device", "cpu",
                 "--methods", "cilmp", "biomedap", "--set", "data.num_patients=5",
                 "--set", "data.views=1", "--set", "batch_size=4", "--set", "eval_batch_size=8",
                 "--set", "progress=false", "--set", "threads=1"]) == 0
    rows = json.load(open(tmp_path / "comparison.json"))["rows"]
    cilmp = "CILMP, CLIP-text knowledge"   # the rows name CILMP's knowledge source
    assert [(r["method"], r["split"].split()[0]) for r in rows] == [
        (cilmp, "fold"), (cilmp, "transfer"), ("BiomedAP", "fold"), ("BiomedAP", "transfer")]
    assert all(r["n"] > 0 and r["metrics"]["auc"][0] == r["metrics"]["auc"][0] for r in rows)
    html = open(tmp_path / "report.html").read()
    table = html[html.index("Methods side by side"):]
    assert re.findall(r"<tr><td>([^<]+)</td>", table)[:4] == [cilmp, cilmp, "BiomedAP", "BiomedAP"]
    low = json.load(open(tmp_path / "biomedap" / "metrics.json"))["config"]["model"]
    assert low.get("low_anchor", "code") == "code"   # the demo trains the authors' code's anchor


def test_demo_keeps_one_shared_recipe(tmp_path, capsys):
    """The demo's table is like for like: every method trains with the config's one recipe;
    ``recipe=reference`` (each method's authors' own) is refused before anything trains."""
    from avpt.cli import main

    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--device", "cpu",
                 "--methods", "cilmp", "avpt", "--set", "recipe=reference"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one shared recipe" in err[0], err
    assert not (tmp_path / "cilmp").exists()
