"""The `refattn` command: check, golden, rollout, metrics, bench."""

import json
import subprocess
import sys

import numpy as np
import pytest

import refattn
from refattn import crosscheck, io
from refattn.cli import main


def test_check_runs_the_builtin_suite_and_prints_a_table(capsys):
    code = main(["check", "--no-torch", "--cases", "plain", "causal_bottom_right", "sinks"])
    out = capsys.readouterr().out
    assert code == 0
    assert "refattn online (FA2)" in out and "refattn loops" in out and "causal_bottom_right" in out
    assert "[FAIL]" not in out and "[error]" not in out and " pass, 0 FAIL, 0 error" in out


def test_check_json(capsys):
    assert main(["check", "--no-torch", "--only", "chunked", "--cases", "plain", "dropout", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["case"] for r in rows] == ["plain", "dropout"]
    assert all(r["status"] == "pass" and r["ratio"] <= 1 for r in rows)


def test_a_planted_wrong_implementation_fails():
    def top_left(case):  # ignores the case's bottom-right alignment
        opts = dict(case.sdpa_options(), align="top_left")
        return {"out": refattn.sdpa(case.q, case.k, case.v, **opts)}

    cases = [c for c in io.standard_suite() if c.name in ("causal_bottom_right", "plain")]
    rows = crosscheck.run_checks(cases, [crosscheck.Implementation("wrong alignment", "float64", top_left)])
    status = {r.case: r.status for r in rows}
    assert status == {"plain": "pass", "causal_bottom_right": "FAIL"}
    assert "does NOT match" in rows[1].detail


def test_a_crashing_implementation_is_an_error_row():
    def boom(case):
        raise ValueError("kernel exploded")

    rows = crosscheck.run_checks(io.standard_suite()[:1], [crosscheck.Implementation("boom", "float64", boom)])
    assert rows[0].status == "error" and "kernel exploded" in rows[0].detail


def test_check_files_written_by_another_implementation(tmp_path, capsys):
    assert main(["golden", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["check", str(tmp_path)]) == 0
    capsys.readouterr()
    path = tmp_path / "gqa.npz"
    case = io.load_case(path)
    wrong = dict(case.outputs)
    wrong["dk"] = wrong["dk"] * 1.001  # a gradient slightly off
    io.save_case(path, case.with_outputs(wrong, implementation="planted"))
    assert main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "planted" in out and "FAIL" in out and "dk: FAIL" in out
    assert main(["check", str(path), "--rule", "allclose", "--dtype", "float32"]) == 1


def test_bad_targets_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nothing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["check", str(tmp_path)]) == 2
    assert "no .npz case files" in capsys.readouterr().err
    assert main(["check", "--cases", "no_such_case"]) == 2


@pytest.fixture
def maps_file(tmp_path):
    rng = np.random.default_rng(0)
    layers = [refattn.softmax(3 * rng.standard_normal((2, 4, 8, 8))) for _ in range(3)]
    mask = np.ones((2, 8), dtype=bool)
    mask[1, 6:] = False
    path = tmp_path / "maps.npz"
    io.save_attentions(path, layers, mask=mask, tokens=rng.integers(0, 5, (2, 8)))
    return path, layers, mask


def test_rollout_and_metrics_commands(maps_file, capsys):
    path, layers, mask = maps_file
    assert main(["rollout", str(path), "--json"]) == 0
    got = np.array(json.loads(capsys.readouterr().out)["rollout_row"])
    np.testing.assert_allclose(got, refattn.rollout(layers, mask=mask)[:, 0], rtol=1e-12)
    assert main(["rollout", str(path), "--top", "3"]) == 0
    assert "row sum" in capsys.readouterr().out
    assert main(["metrics", str(path)]) == 0
    out = capsys.readouterr().out
    assert "entropy" in out and "induction" in out and "head diversity per layer" in out
    assert main(["metrics", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert np.array(summary["entropy"]).shape == (3, 4)


def test_plots_are_written_and_not_empty(maps_file, tmp_path):
    pytest.importorskip("matplotlib")
    path, _, _ = maps_file
    for command in ("rollout", "metrics"):
        png = tmp_path / f"{command}.png"
        assert main([command, str(path), "--plot", str(png)]) == 0
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_console_entry_points():
    run = subprocess.run(
        [sys.executable, "-m", "refattn", "check", "--no-torch", "--only", "loops", "--cases", "plain"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "refattn loops" in run.stdout
    bench = subprocess.run(
        [sys.executable, "-m", "refattn", "bench", "--help"], capture_output=True, text=True, timeout=300
    )
    assert bench.returncode == 0 and "--quick" in bench.stdout
