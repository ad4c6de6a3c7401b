"""The `refattn` command: check, golden, rollout, metrics, bench."""

import argparse
import io as pyio
import json
import subprocess
import sys

import numpy as np
import pytest

import refattn
from refattn import crosscheck, io
from refattn.bench import options as bench_options
from refattn.cli import _parser, main


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
    mask = np.ones((2, 8), dtype=bool)
    mask[1, 6:] = False  # item 1: two padding tokens, never attended to
    layers = [refattn.softmax(3 * rng.standard_normal((2, 4, 8, 8)), mask=mask[:, None, None, :]) for _ in range(3)]
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


# ---- user errors: one line on stderr, exit status 2, never a traceback (issue 11) -------------


def _user_error(capsys, argv, *fragments):
    """``refattn argv`` exits 2 with one line on stderr holding every fragment; returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _usage_error(capsys, argv, fragment):
    """An argparse refusal: status 2, the usage, and ``error: argument ...`` naming the option."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert fragment in err.strip().splitlines()[-1], err


def test_rollout_row_out_of_range_is_a_user_error(maps_file, capsys):
    path, _, _ = maps_file
    line = _user_error(capsys, ["rollout", str(path), "--row", "99"], "--row", "[-8, 8)", "got 99")
    assert line.startswith("refattn rollout: ")


def test_rollout_negative_row_counts_from_the_end(maps_file, capsys):
    path, layers, mask = maps_file
    assert main(["rollout", str(path), "--row", "-1", "--json"]) == 0
    got = np.array(json.loads(capsys.readouterr().out)["rollout_row"])
    np.testing.assert_allclose(got, refattn.rollout(layers, mask=mask)[:, 7], rtol=1e-12, atol=0)


@pytest.mark.parametrize("command", ["rollout", "metrics"])
def test_plot_paths_are_checked_before_any_work(maps_file, tmp_path, capsys, command):
    path, _, _ = maps_file
    missing = tmp_path / "no_such_folder" / "fig.png"
    _user_error(capsys, [command, str(path), "--plot", str(missing)], "--plot: the folder", "does not exist")
    assert not missing.parent.exists()
    text = tmp_path / "fig.txt"
    _user_error(capsys, [command, str(path), "--plot", str(text)], "--plot: expected a file name ending in .png")
    assert not text.exists()
    _user_error(capsys, [command, str(path), "--plot", str(tmp_path)], "--plot: expected a file name ending in")


def test_golden_into_a_file_is_a_user_error(tmp_path, capsys):
    target = tmp_path / "taken.npz"
    target.write_bytes(b"mine")
    _user_error(capsys, ["golden", str(target)], "refattn golden: directory: expected a directory", "taken.npz")
    assert target.read_bytes() == b"mine"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["rollout", "MAPS", "--top", "0"], "argument --top: expected an integer >= 1, got 0"),
        (["rollout", "MAPS", "--residual", "2"], "argument --residual: expected a number in [0, 1], got '2'"),
        (["rollout", "MAPS", "--residual", "nan"], "argument --residual: expected a number in [0, 1]"),
        (["rollout", "MAPS", "--row", "first"], "argument --row: invalid int value: 'first'"),
        (["rollout", "MAPS", "--head-fusion", "median"], "argument --head-fusion: invalid choice: 'median'"),
        (["metrics", "MAPS", "--max-bytes", "lots"], "argument --max-bytes: expected a size in bytes"),
        (["check", "MAPS", "--dtype", "float12"], "argument --dtype: dtype: expected one of"),
        (["check", "--rule", "close"], "argument --rule: invalid choice: 'close'"),
        (["golden", "DIR", "--suite", "huge"], "argument --suite: invalid choice: 'huge'"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_numbers_and_names_are_usage_errors(maps_file, tmp_path, capsys, argv, fragment):
    path, _, _ = maps_file
    argv = [str(path) if a == "MAPS" else str(tmp_path) if a == "DIR" else a for a in argv]
    _usage_error(capsys, argv, fragment)


@pytest.mark.parametrize("command", ["rollout", "metrics", "check"])
def test_wrong_file_kinds_are_user_errors(tmp_path, capsys, command):
    npy = tmp_path / "one.npy"
    np.save(npy, np.ones(3))
    _user_error(capsys, [command, str(npy)], f"refattn {command}: ", "a .npy file (a single array), expected a .npz")
    text = tmp_path / "notes.npz"
    text.write_text("not an archive\n")
    _user_error(capsys, [command, str(text)], "a text file, expected a .npz")
    missing = tmp_path / "missing.npz"
    _user_error(capsys, [command, str(missing)], "missing.npz", "no such file")


def test_the_size_cap_is_raised_with_max_bytes(maps_file, capsys):
    path, _, _ = maps_file
    line = _user_error(capsys, ["metrics", str(path), "--max-bytes", "1K"], "over the size cap max_bytes=1024")
    assert "--max-bytes" in line
    assert main(["metrics", str(path), "--max-bytes", "1M"]) == 0


def test_a_case_file_is_not_a_map_file_and_back(maps_file, tmp_path, capsys):
    path, _, _ = maps_file
    _user_error(capsys, ["check", str(path)], "an attention-map file", "expected a case file")
    case = io.standard_suite()[0]
    case_path = io.save_case(tmp_path / "case.npz", case.with_outputs(io.golden_outputs(case)))
    _user_error(capsys, ["rollout", str(case_path)], "a case file", "expected an attention-map file")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["check", "TARGET", "--cases", "plain"], "--cases: selects built-in implementations or cases"),
        (["check", "TARGET", "--only", "loops"], "--only: selects built-in implementations or cases"),
        (["check", "TARGET", "--no-torch"], "--no-torch: selects built-in implementations or cases"),
        (["check", "--dtype", "float32"], "--dtype: applies to case files: give a TARGET"),
        (["check", "--max-bytes", "1G"], "--max-bytes: applies to case files: give a TARGET"),
        (["check", "--inputs", "x.npz"], "--inputs: applies to an ONNX model"),
        (["check", "TARGET", "--runtime", "reference"], "--runtime: applies to an ONNX model"),
        (["check", "--seed", "3"], "--seed: applies to an ONNX model"),
        (["check", "--cases", "plain", "plian"], "--cases: no such case ['plian']"),
        (["check", "--only", "loops", "no_such_impl"], "--only: ['no_such_impl'] match no implementation"),
    ],
)
def test_check_flags_that_would_be_ignored_are_refused(maps_file, capsys, argv, fragment):
    path, _, _ = maps_file
    _user_error(capsys, [str(path) if a == "TARGET" else a for a in argv], fragment)


def _small_golden_dir(directory, names=("plain", "sinks", "gqa")):
    directory.mkdir()
    for case in io.standard_suite():
        if case.name in names:
            io.save_case(directory / f"{case.name}.npz", case.with_outputs(io.golden_outputs(case)))
    return directory


def test_check_dir_judges_every_file_and_reports_the_broken_ones(maps_file, tmp_path, capsys):
    d = _small_golden_dir(tmp_path / "cases")
    (d / "a_text.npz").write_text("hello\n")
    with open(d / "b_array.npz", "wb") as fh:
        np.save(fh, np.ones(2))
    maps, _, _ = maps_file
    (d / "c_maps.npz").write_bytes(maps.read_bytes())
    io.save_case(d / "d_no_outputs.npz", io.standard_suite()[0])
    assert main(["check", str(d), "--json"]) == 1
    rows = {r["case"]: r for r in json.loads(capsys.readouterr().out)}
    assert {name: r["status"] for name, r in rows.items()} == {
        "a_text": "error",
        "b_array": "error",
        "c_maps": "error",
        "d_no_outputs": "error",
        "gqa": "pass",
        "plain": "pass",
        "sinks": "pass",
    }
    assert "a text file, expected a .npz case file" in rows["a_text"]["detail"]
    assert "a .npy file (a single array)" in rows["b_array"]["detail"]
    assert "an attention-map file" in rows["c_maps"]["detail"]
    assert "no outputs to check" in rows["d_no_outputs"]["detail"]
    assert rows["d_no_outputs"]["implementation"] == "d_no_outputs.npz"


def test_check_dir_table_lists_the_good_and_the_broken_files(tmp_path, capsys):
    d = _small_golden_dir(tmp_path / "cases")
    (d / "broken.npz").write_text("x")
    assert main(["check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "[error] broken / broken.npz" in out
    assert "summary: 3 pass, 0 FAIL, 1 error, 0 unsupported (of 4 checks)" in out


def test_a_single_broken_file_is_bad_input(tmp_path, capsys):
    path = tmp_path / "broken.npz"
    path.write_text("x")
    _user_error(capsys, ["check", str(path)], "broken.npz: a text file")


def test_progress_is_a_line_per_group_when_not_a_terminal(capsys):
    assert main(["check", "--no-torch", "--only", "chunked", "loops", "--cases", "plain", "sinks"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["refattn check: 0/4 refattn chunked", "refattn check: 2/4 refattn loops"]
    assert lines[2].startswith("refattn check: 4/4 done in ")
    assert len(lines) == 3


def test_progress_of_a_directory_is_a_line_per_file(tmp_path, capsys):
    d = _small_golden_dir(tmp_path / "cases", names=("plain", "sinks"))
    assert main(["check", str(d)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["refattn check: 0/2 plain.npz", "refattn check: 1/2 sinks.npz"]
    assert lines[2].startswith("refattn check: 2/2 done in ")


def test_quiet_check_prints_no_progress(capsys):
    assert main(["check", "--quiet", "--no-torch", "--only", "loops", "--cases", "plain"]) == 0
    assert capsys.readouterr().err == ""


class _Terminal(pyio.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place():
    stream = _Terminal()
    progress = crosscheck.Progress(stream=stream, width=4)
    progress(0, 2, "impl: a")
    progress(1, 2, "impl: b")
    progress(2, 2, "done")
    text = stream.getvalue()
    assert text.startswith("\r[....] 0/2 impl: a")
    assert "\r[##..] 1/2 impl: b" in text
    assert text.endswith("\n") and text.count("\n") == 1


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"refattn {refattn.__version__}\n"


def _options(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {o}", a) for o, a in _options(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "/".join(action.option_strings) or action.dest, action


def test_every_option_of_every_subcommand_has_help():
    options = dict(_options(_parser()))
    assert {"check --max-bytes", "rollout --row", "metrics --plot", "golden directory", "--version"} <= set(options)
    missing = sorted(name for name, action in options.items() if not action.help)
    assert missing == []
    bench = dict(_options(bench_options.parser()))
    assert {"--quick", "--sizes", "--repeats", "--memory-sizes", "--rollout/--no-rollout", "--plan"} <= set(bench)
    assert sorted(name for name, action in bench.items() if not action.help) == []


def test_os_errors_are_user_errors_and_other_exceptions_are_bugs(tmp_path, capsys, monkeypatch):
    def denied(directory, suite="standard"):
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(io, "write_golden", denied)
    _user_error(capsys, ["golden", str(tmp_path / "out")], "refattn golden: ", "out: Permission denied")

    def bug(directory, suite="standard"):
        raise ZeroDivisionError("an internal bug")

    monkeypatch.setattr(io, "write_golden", bug)
    with pytest.raises(ZeroDivisionError, match="an internal bug"):
        main(["golden", str(tmp_path / "out")])


# ---- refattn bench: plan, estimate, --quick, progress, no numba --------------------------------


def test_quick_does_not_override_explicit_flags():
    args = bench_options.parse_args(["--quick", "--sizes", "256", "--repeats", "2"])
    assert args.sizes == [256]
    assert args.repeats == 2
    assert args.memory_sizes == bench_options.QUICK["memory_sizes"]
    assert args.rollout is False
    assert bench_options.parse_args(["--quick", "--rollout"]).rollout is True
    assert bench_options.parse_args([]).sizes == bench_options.FULL["sizes"]


def test_the_plan_says_where_each_value_came_from_and_how_long_the_run_takes():
    args = bench_options.parse_args(["--quick", "--sizes", "256"])
    lines = bench_options.plan_lines(args, rate=50e9)
    assert lines[0].startswith("SDPA sizes 256 (given), 3 repeats (--quick); memory sizes 4096 8192 (--quick)")
    assert "the full run: about" in lines[1] and "--quick: about" in lines[1]
    full = bench_options.estimate_seconds(bench_options.parse_args([]), 50e9, kernel=True, torch=True)
    quick = bench_options.estimate_seconds(bench_options.parse_args(["--quick"]), 50e9, kernel=True, torch=True)
    assert 4 * 60 < full < 30 * 60  # RESULTS.md's full run took ~10 min on a machine of this rate
    assert quick < full / 2


def test_bench_plan_prints_the_estimate_and_runs_nothing(capsys):
    assert main(["bench", "--plan"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "refattn bench: [" in captured.err and "the full run: about" in captured.err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--sizes", "0"], "argument --sizes: expected a positive integer, got 0"),
        (["--repeats", "many"], "argument --repeats: expected a positive integer, got 'many'"),
        (["--output", "no_such_folder/RESULTS.md"], "--output: the folder 'no_such_folder' does not exist"),
    ],
)
def test_bench_bad_options_are_usage_errors(capsys, argv, fragment):
    _usage_error(capsys, ["bench", *argv], fragment)


def test_bench_runs_without_numba_with_numpy_rows_only():
    code = (
        "import sys; sys.modules['numba'] = None\n"  # numba unimportable, as if not installed
        "from refattn.cli import main\n"
        "sys.exit(main(['bench', '--sizes', '32', '--repeats', '1', '--memory-sizes', '64', '--no-rollout']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "| forward | 32 | False | refattn numpy |" in run.stdout
    assert "refattn kernel" not in run.stdout
    assert "numba is not installed: NumPy and PyTorch rows only" in run.stderr
    assert "refattn bench: [" in run.stderr and "] SDPA N=32" in run.stderr


def test_maps_that_are_not_probabilities_are_refused_unless_asked(tmp_path, capsys):
    logits = np.random.default_rng(3).standard_normal((2, 1, 2, 5, 5))  # raw scores saved by mistake
    path = tmp_path / "logits.npz"
    io.save_attentions(path, list(logits))
    for command in ("rollout", "metrics"):
        line = _user_error(capsys, [command, str(path)], "expected probabilities")
        assert "--no-check-probabilities" in line
        assert main([command, str(path), "--no-check-probabilities"]) == 0
        capsys.readouterr()


# ---- what --plot draws: --layer, --heads, --batch, --tokens, --row (issue 12, point 6) ---------


@pytest.fixture
def figures(monkeypatch):
    """The Figures the command draws (and writes), with the options it drew them with."""
    pytest.importorskip("matplotlib")
    from refattn import plot

    drawn, report = [], plot.attention_report

    def capture(layers, **options):
        fig = report(layers, **options)
        drawn.append((fig, options))
        return fig

    monkeypatch.setattr(plot, "attention_report", capture)
    return drawn


def _gids(fig, prefix):
    return [ax for ax in fig.axes if (ax.get_gid() or "").startswith(prefix)]


def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_defaults_last_layer_item_0_every_head_and_the_files_tokens(maps_file, tmp_path, figures, capsys):
    path, layers, mask = maps_file
    png = tmp_path / "metrics.png"
    assert main(["metrics", str(path), "--plot", str(png)]) == 0
    assert _png(png) and f"plot written to {png}" in capsys.readouterr().out
    ((fig, options),) = figures
    heads = _gids(fig, "head ")
    assert [ax.get_gid() for ax in heads] == [f"head 2 {h}" for h in range(4)]
    assert len({ax.images[0].get_clim() for ax in heads}) == 1 and _gids(fig, "heads colorbar")
    tokens = np.load(path)["tokens"]
    assert [t.get_text() for t in heads[0].yaxis.get_ticklabels()] == [str(t) for t in tokens[0]]
    (curves,) = _gids(fig, "metrics")
    assert "induction" in [line.get_label() for line in curves.get_lines()]
    assert not _gids(fig, "rollout row")  # metrics has no --row


def test_plot_layer_heads_batch_and_tokens_choose_the_figure(maps_file, tmp_path, figures, capsys):
    path, layers, mask = maps_file
    png = tmp_path / "chosen.png"
    words = "the,cat,sat,on,a,red,mat,."
    argv = ["metrics", str(path), "--plot", str(png), "--layer", "0-1", "--heads", "1,3", "--batch", "1"]
    assert main([*argv, "--tokens", words]) == 0
    assert _png(png)
    ((fig, options),) = figures
    heads = {ax.get_gid(): ax for ax in _gids(fig, "head ")}
    assert sorted(heads) == ["head 0 1", "head 0 3", "head 1 1", "head 1 3"]
    np.testing.assert_array_equal(heads["head 1 3"].images[0].get_array(), layers[1][1, 3])
    assert [t.get_text() for t in heads["head 0 1"].yaxis.get_ticklabels()] == words.split(",")
    np.testing.assert_array_equal(_gids(fig, "rollout")[0].images[0].get_array(), refattn.rollout(layers, mask=mask)[1])
    figures.clear()
    assert main(["metrics", str(path), "--plot", str(png), "--layer", "all", "--heads", "2"]) == 0
    assert sorted(ax.get_gid() for ax in _gids(figures[0][0], "head ")) == ["head 0 2", "head 1 2", "head 2 2"]
    figures.clear()
    assert main(["metrics", str(path), "--plot", str(png), "--layer=-2", "--batch", "-1"]) == 0
    assert figures[0][1]["layer"] == [1] and figures[0][1]["item"] == 1


def test_rollout_plot_outlines_the_row_and_keeps_the_token_curve(maps_file, tmp_path, figures):
    path, layers, mask = maps_file
    png = tmp_path / "rollout.png"
    assert main(["rollout", str(path), "--plot", str(png), "--row", "-1", "--batch", "1"]) == 0
    assert _png(png)
    ((fig, options),) = figures
    (ax_map,) = _gids(fig, "rollout")[:1]
    (mark,) = [p for p in ax_map.patches if p.get_gid() == "rollout row mark"]
    assert mark.get_y() == 7 - 0.5
    (bars,) = _gids(fig, "rollout row")
    np.testing.assert_allclose(
        [b.get_height() for b in bars.patches], refattn.rollout(layers, mask=mask)[1, 7], rtol=1e-12, atol=0
    )
    (curves,) = _gids(fig, "metrics")
    assert {"previous_token", "induction"} <= {line.get_label() for line in curves.get_lines()}


def test_plot_with_json_keeps_stdout_json(maps_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, _, _ = maps_file
    png = tmp_path / "fig.png"
    for command in ("rollout", "metrics"):
        assert main([command, str(path), "--plot", str(png), "--json"]) == 0
        out, err = capsys.readouterr()
        json.loads(out)
        assert f"plot written to {png}" in err


def test_plot_says_which_heads_are_left_out(tmp_path, figures, capsys):
    rng = np.random.default_rng(2)
    path = tmp_path / "many_heads.npz"
    io.save_attentions(path, [refattn.softmax(rng.standard_normal((20, 4, 4))) for _ in range(2)])
    png = tmp_path / "fig.png"
    assert main(["metrics", str(path), "--plot", str(png)]) == 0
    err = capsys.readouterr().err
    assert err.strip() == "refattn metrics: --plot: showing heads 0-15 of 20 (at most 16); choose others with --heads"
    fig = figures[0][0]
    assert len(_gids(fig, "head ")) == 16
    assert any("heads 0-15 of 20 shown" in getattr(t, "get_text", str)() for t in fig.findobj())
    assert main(["metrics", str(path), "--plot", str(png), "--heads", "4-19"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["rollout", "metrics"])
@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--layer", "3"], ["--layer: expected layers in [-3, 3) (the maps have 3), got 3"]),
        (["--layer=-4"], ["--layer: expected layers in [-3, 3)", "got -4"]),
        (["--heads", "2-4"], ["--heads: expected heads in [0, 4) (the maps have 4), got 4"]),
        (["--heads", "0-16"], ["--heads: expected heads in [0, 4)"]),
        (["--batch", "2"], ["--batch: expected batch items in [-2, 2) (the maps have 2), got 2"]),
        (["--tokens", "a,b,c"], ["--tokens: expected 8 labels (the maps are n × n, n = 8), got 3 labels"]),
    ],
)
def test_plot_choices_are_checked_against_the_file(maps_file, tmp_path, capsys, command, extra, fragments):
    path, _, _ = maps_file
    png = tmp_path / "fig.png"
    line = _user_error(capsys, [command, str(path), "--plot", str(png), *extra], *fragments)
    assert line.startswith(f"refattn {command}: ")
    assert not png.exists()


@pytest.mark.parametrize("flag, value", [("--layer", "0"), ("--heads", "1"), ("--batch", "0"), ("--tokens", "a,b")])
def test_plot_choices_without_plot_are_refused(maps_file, capsys, flag, value):
    path, _, _ = maps_file
    _user_error(capsys, ["metrics", str(path), flag, value], f"{flag}: chooses what the figure shows: add --plot FIG")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--heads", "x"], "argument --heads: expected indices and ranges such as 0,2,4-6, got 'x'"),
        (["--heads", "-1"], "argument --heads: expected indices and ranges such as 0,2,4-6, got '-1'"),
        (["--heads", "1,-1"], "argument --heads: expected indices and ranges such as 0,2,4-6, got '1,-1'"),
        (["--layer", "3-1"], "argument --layer: expected a range low-high with low <= high, got '3-1'"),
        (["--layer", "last"], "argument --layer: expected indices and ranges such as 0,2,4-6, -1 or all"),
        (["--batch", "first"], "argument --batch: invalid int value: 'first'"),
        (["--tokens", ","], "argument --tokens: expected comma-separated token labels"),
    ],
)
def test_malformed_plot_choices_are_usage_errors(maps_file, tmp_path, capsys, extra, fragment):
    path, _, _ = maps_file
    _usage_error(capsys, ["metrics", str(path), "--plot", str(tmp_path / "fig.png"), *extra], fragment)


# ---- datasets: `refattn metrics STORE`, `refattn check DIR --workers` (specs/datasets.md) ----------


def test_check_dir_in_parallel_gives_the_sequential_rows(tmp_path, capsys):
    d = _small_golden_dir(tmp_path / "cases")
    (d / "broken.npz").write_text("x")
    assert main(["check", str(d), "--json"]) == 1
    sequential = json.loads(capsys.readouterr().out)
    assert main(["check", str(d), "--json", "--workers", "2"]) == 1
    captured = capsys.readouterr()
    parallel = json.loads(captured.out)
    assert [dict(r, seconds=0) for r in parallel] == [dict(r, seconds=0) for r in sequential]
    assert "refattn check: 4/4 done" in captured.err


@pytest.mark.parametrize("argv", [["check", "--workers", "2"], ["check", "FILE", "--workers", "2"]])
def test_check_workers_needs_a_directory(maps_file, capsys, argv):
    path, _, _ = maps_file
    _user_error(capsys, [str(path) if a == "FILE" else a for a in argv], "--workers: judges the files of a directory")


@pytest.mark.dask
def test_metrics_of_a_dataset(maps_file, tmp_path, capsys):
    """A Zarr store and a directory of map files, on the threaded scheduler and on 2 local workers."""
    pytest.importorskip("dask.array")
    pytest.importorskip("zarr")
    from refattn import datasets

    path, layers, mask = maps_file
    tokens = io.load_attentions(path)[2]
    maps = np.stack(layers, axis=1)  # (N, L, H, n, n)
    datasets.save_maps(tmp_path / "store.zarr", maps, mask=mask, tokens=tokens, chunk_size=1)
    want = {k: v.tolist() for k, v in refattn.metrics.summarize(layers, tokens, mask=mask).items()}
    assert main(["metrics", str(tmp_path / "store.zarr")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dataset ") and "2 examples, 3 layers, 4 heads, 8 tokens, 2 chunks" in out
    assert "head diversity per layer" in out
    assert main(["metrics", str(tmp_path / "store.zarr"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == want
    files = tmp_path / "files"
    files.mkdir()
    for i in range(2):
        io.save_attentions(
            files / f"{i}.npz", [a[i : i + 1] for a in layers], mask=mask[i : i + 1], tokens=tokens[i : i + 1]
        )
    assert main(["metrics", str(files), "--json", "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == want
    _user_error(capsys, ["metrics", str(files), "--plot", str(tmp_path / "f.png")], "--plot: draws the maps of one")
    _user_error(capsys, ["metrics", str(tmp_path / "nothing"), "--workers", "2"], "nothing: no such file or directory")


# ---- refattn model: the experiments of refattn.model.experiments --------------------------------


def test_model_runs_an_experiment_and_writes_its_table_and_figure(tmp_path, capsys):
    assert main(["model", "loops-vs-matrix", "--tiny", "--quiet", "--output", str(tmp_path)]) == 0
    assert "loops-vs-matrix.md" in capsys.readouterr().out
    text = (tmp_path / "loops-vs-matrix.md").read_text()
    assert text.startswith("# Experiment `loops-vs-matrix`")
    assert "Command: `refattn model loops-vs-matrix --tiny`" in text
    assert (tmp_path / "loops-vs-matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_model_refuses_an_unknown_experiment(capsys):
    _usage_error(capsys, ["model", "bengio"], "invalid choice: 'bengio'")


def test_bench_model_section_goes_with_the_rollout_section_unless_asked():
    assert bench_options.parse_args([]).model is True
    assert bench_options.parse_args(["--quick"]).model is False
    assert bench_options.parse_args(["--quick", "--model"]).model is True
    assert bench_options.parse_args(["--no-model"]).model is False
    with_model = bench_options.estimate_seconds(bench_options.parse_args(["--model"]), 50e9, kernel=True, torch=True)
    without = bench_options.estimate_seconds(bench_options.parse_args(["--no-model"]), 50e9, kernel=True, torch=True)
    assert 10 < with_model - without < 60
