import json

from icbs.cli import main
from icbs.digits import DigitsRecipe, evaluate, load_data, trained_model


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ICBS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    main(["demo", "--budget", "3", "--sparsity", "0.9", "--out", str(out)])
    table = capsys.readouterr().out
    assert "icbs" in table and "wanda" in table
    report = json.loads((out / "report.json").read_text())
    results = {r["method"]: r for r in report["results"]}
    assert results["dense"]["accuracy"] > 0.95
    # iCBS starts from the magnitude mask and only keeps steps that lower the loss
    assert results["icbs"]["accuracy"] > results["magnitude"]["accuracy"] + 0.1
    assert report["icbs_report"]["trace"]
    for layer in report["icbs_report"]["layers"]:
        rows, cols = layer["shape"]
        assert abs(layer["sparsity"] - 0.9) <= 0.5 / (rows * cols)
    assert (out / "accuracy.png").stat().st_size > 10_000


def test_trained_model_is_cached_and_reproducible(tmp_path):
    recipe = DigitsRecipe(epochs=2)
    data = load_data(recipe)
    first = trained_model(recipe, data, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("digits_mlp_*.pt"))) == 1
    again = trained_model(recipe, data, cache_dir=tmp_path)
    assert evaluate(first, data.x_test, data.y_test) == evaluate(again, data.x_test, data.y_test)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys, monkeypatch):
    import pytest

    monkeypatch.setenv("ICBS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tmp_path / "none"), "--text", str(tmp_path / "none.txt")])
    assert exit_info.value.code == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--sparsity", "1.5", "--out", str(tmp_path / "d")])
    assert "sparsity must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before training anything
