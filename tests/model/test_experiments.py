"""refattn.model.experiments: each experiment runs at toy sizes and writes its table and figure,
deterministically; the committed tables under benchmarks/model/ are what the current code renders
from their records, with the current configurations; the quick one (loops-vs-matrix) is re-run."""

import json
import pathlib

import numpy as np
import pytest

from refattn import RefAttnError
from refattn.model import experiments as ex

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "model"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    """Each experiment at toy sizes, run once into a temporary folder: ``{name: (record, folder)}``."""
    folder = tmp_path_factory.mktemp("experiments")
    return {name: (ex.run(name, tiny=True, output=folder), folder) for name in ex.EXPERIMENTS}


@pytest.mark.parametrize("name", ex.EXPERIMENTS)
def test_a_tiny_run_writes_its_table_and_figure(tiny_records, name):
    record, folder = tiny_records[name]
    text = (folder / f"{name}.md").read_text()
    assert text.startswith(f"# Experiment `{name}`: ")
    assert "\n## Results\n" in text and "\n## Record\n" in text
    assert f"Command: `python -m refattn.model.experiments {name} --tiny`" in text
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG
    assert ex.parse_record(text) == record
    assert text == ex.render(record)
    assert {k: record[k] for k in ("config_sha256", "results_sha256")} == ex.record_hashes(record)
    assert record["config"] == ex.default_config(name, tiny=True)


@pytest.mark.parametrize("name", ex.EXPERIMENTS)
def test_a_tiny_run_is_deterministic(tiny_records, name):
    again = ex.run(name, tiny=True)
    first = tiny_records[name][0]
    assert again["results"] == first["results"]
    assert again["results_sha256"] == first["results_sha256"]


def test_the_tables_have_their_rows(tiny_records):
    lines = {name: ex.render(r).splitlines() for name, (r, _) in tiny_records.items()}
    assert sum(line.startswith("| padding mask and head mask |") for line in lines["loops-vs-matrix"]) == 1
    assert sum(line.startswith("| attention LM |") for line in lines["lm-vs-bengio"]) == 2  # recall, corpus
    assert sum(line.startswith("| Bengio MLP (h=") for line in lines["lm-vs-bengio"]) == 2
    heads = tiny_records["heads"][0]["config"]["lm"]
    per_head = [line for line in lines["heads"] if line[:2] == "| " and line[2:3].isdigit() and "." in line[:6]]
    assert len(per_head) == heads["n_layers"] * heads["n_heads"]
    pruned = [line for line in lines["heads"] if line.startswith("| ") and "/" in line.split("|")[1]]
    assert len(pruned) == heads["n_layers"] * heads["n_heads"] + 1  # 0 .. all heads


def test_a_tiny_heads_run_prunes_every_head_once(tiny_records):
    r = tiny_records["heads"][0]["results"]
    n_layers, n_heads = np.shape(r["pruned_alone"])
    for name in ("iterative", "iterative_raw", "weight_norm"):
        order = [tuple(x) for x in r["orders"][name]]
        assert sorted(order) == [(a, b) for a in range(n_layers) for b in range(n_heads)], name
    p = r["pruning"]
    assert p["iterative"][0] == p["weight_norm"][0] == p["iterative_raw"][0] == r["val_loss"]  # nothing pruned
    assert p["iterative"][-1] == p["weight_norm"][-1] == p["random"][0][-1]  # every head pruned: the same model
    assert r["importance_max_difference"] <= 1e-12  # one target per sequence: per example = per token


def test_matched_parameter_counts_are_near():
    record = ex.default_config("lm-vs-bengio")
    assert record["recall"]["bengio"]["context_size"] <= record["recall"]["task"]["distance"]  # the answer unseen
    for target in (26_496, 72_000):
        for v, n, m in ((16, 4, 16), (256, 8, 16)):
            h = ex._matched_hidden(target, v, n, m)
            per = n * m + 1 + v
            assert abs(ex._bengio_count(v, n, m, h) - target) <= per / 2 or h == 1


def test_a_bad_name_is_refused():
    with pytest.raises(RefAttnError, match="name"):
        ex.default_config("loops")
    with pytest.raises(RefAttnError, match="name"):
        ex.run("bengio", tiny=True)


def test_a_file_without_a_record_is_refused():
    with pytest.raises(RefAttnError, match="Record"):
        ex.parse_record("# Experiment\n\nno record here\n")


def test_the_command_line_writes_the_files(tmp_path, capsys):
    assert ex.main(["loops-vs-matrix", "--tiny", "--quiet", "--output", str(tmp_path)]) == 0
    assert "wrote " in capsys.readouterr().out
    assert (tmp_path / "loops-vs-matrix.png").read_bytes()[:8] == PNG
    with pytest.raises(SystemExit) as exc:
        ex.main(["no-such-experiment"])
    assert exc.value.code == 2


# ---- the committed results ----------------------------------------------------------------------


def _committed(name):
    path = COMMITTED / f"{name}.md"
    assert path.exists(), f"{path} is missing: run python -m refattn.model.experiments {name}"
    text = path.read_text()
    return text, ex.parse_record(text)


@pytest.mark.parametrize("name", ex.EXPERIMENTS)
def test_the_committed_table_is_what_the_current_code_renders(name):
    text, record = _committed(name)
    assert record["name"] == name
    assert record["config"] == ex.default_config(name), "the configuration changed: re-run the experiment"
    assert {k: record[k] for k in ("config_sha256", "results_sha256")} == ex.record_hashes(record)
    assert text == ex.render(record), "the rendering changed: re-render the record (or re-run)"
    assert record["meta"]["command"] == f"python -m refattn.model.experiments {name}"
    assert (COMMITTED / f"{name}.png").read_bytes()[:8] == PNG


def test_the_committed_loops_vs_matrix_is_rerun():
    """The one experiment under 30 s: the committed configuration again, its agreement as committed
    (every difference at the 1e-12 level; the exact digits are rounding, machine-dependent)."""
    _, record = _committed("loops-vs-matrix")
    assert record["meta"]["seconds"] < 30
    again = ex.run("loops-vs-matrix", config=record["config"])
    assert again["results"]["params"] == record["results"]["params"]
    for runs in (again, record):
        agreement = runs["results"]["agreement"]
        assert set(agreement) == {"plain", "padding mask and head mask"}
        for row in agreement.values():
            assert max(v for k, v in row.items() if k != "worst_leaf") <= 1e-12
    timings = again["timings"]
    assert timings["loops forward"] > timings["matrix forward"]


def test_the_committed_lm_vs_bengio_shows_what_the_spec_says():
    """specs/model.md, "Experiments": the attention LM solves the recall task, Bengio's model is no better
    than chance (its context cannot reach the answer); the parameter counts match within 1 %."""
    _, record = _committed("lm-vs-bengio")
    recall = record["results"]["recall"]
    assert recall["lm"]["accuracy"] >= 0.99
    assert recall["lm"]["val_loss"] < 0.05
    assert recall["bengio"]["val_loss"] > recall["chance_loss"] - 0.02  # no better than chance
    assert recall["bengio"]["accuracy"] < 2 / (record["config"]["recall"]["task"]["vocab"] - 1)
    for part in ("recall", "corpus"):
        lm, bengio = (record["results"][part][m]["params"] for m in ("lm", "bengio"))
        assert abs(lm - bengio) / lm < 0.01


def test_the_committed_record_is_json_with_sorted_keys():
    for name in ex.EXPERIMENTS:
        text, record = _committed(name)
        block = text.split("```json\n", 1)[1].rsplit("\n```", 1)[0]
        assert block == json.dumps(record, sort_keys=True, indent=1)


# ---- the benchmark's LM step (refattn/bench/model.py): the torch twin agrees -------------------------


@pytest.mark.torch
def test_the_bench_torch_twin_is_the_same_model():
    pytest.importorskip("torch")
    from refattn.bench import model as bench_model

    shape = {"vocab_size": 11, "d_model": 8, "n_layers": 2, "n_heads": 2, "batch": 2, "seq_len": 5}
    m = bench_model.model_rows(repeats=1, shape=shape)
    assert m["loss_rel"] <= 1e-12 and m["grad_rel"] <= 1e-10
    assert len(m["refattn"]) == len(m["torch"]) == 1
    section, target = bench_model.model_lines(m)
    assert any(line.startswith("| refattn `lm_loss_and_grads` |") for line in section)
    assert len(target) == 1 and target[0].startswith("| LM training step: refattn ≤ 1.5× torch autograd")
