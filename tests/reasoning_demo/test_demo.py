"""`mergekit-rl demo --quick`: every stage leaves its artefact, the report has every row, a
rerun reuses finished stages, and the vector stages agree with an in-memory recomputation."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import load_state

from mergekit_rl.cli import main
from reasoning_demo.recipe import make_recipe
from reasoning_demo.report import GOALS, ROWS


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(main, ["demo", "--quick", "-q", "--workers", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_stage_produces_its_artefact(quick_run):
    out, output = quick_run
    for name in ("base", "sft", "grpo", "instruct", "instruct_plus_v", "instruct_minus_v",
                 "merge", "wpo", "dpo", "judge", "pairwise", "instruct_plus_v_pairwise"):
        assert (out / "models" / name / "config.json").is_file(), name
        assert list((out / "models" / name).glob("*.safetensors")), name
    assert (out / "vector" / "provenance.json").is_file()
    assert (out / "data" / "pairs.jsonl").stat().st_size > 0
    for name in ("pretrain", "sft", "grpo", "instruct", "pairs", "wpo", "dpo", "merge", "judge",
                 "pairwise"):
        assert (out / "configs" / f"{name}.yaml").is_file(), name
    assert (out / "report.png").stat().st_size > 0
    for text in ("model", "word problems", "instruct+v", "grpo beats sft"):
        assert text in output


def test_report_has_every_row(quick_run):
    out, _ = quick_run
    report = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["task"]) for r in report["rows"]] == list(ROWS)
    for row in report["rows"]:
        assert 0 <= row["accuracy"] <= 100 and row["n"] == make_recipe(quick=True).n_test
        # word problems also report the share of complete solutions; instructions do not
        assert (row["complete"] is None) == (row["task"] == "instruction")
    assert [g["goal"] for g in report["goals"]] == [g[0] for g in GOALS]
    assert report["vector"]["groups"]
    # the judge's verdict on each donor, split by the worked solution it is compared with
    judged = report["judged"]
    assert judged["n_correct"] + judged["n_flawed"] == make_recipe(quick=True).n_test
    assert judged["n_correct"] > 0 and judged["n_flawed"] > 0  # flawed_share 0.5
    for name in ("sft", "grpo", "pairwise"):
        for part in ("correct", "flawed"):
            assert 0 <= judged[name][part]["win_rate"] <= 1
    assert 0 <= judged["judge"]["eval/accuracy"] <= 1


def test_vector_stages_match_an_in_memory_recomputation(quick_run):
    out, _ = quick_run
    grpo, sft, inst = (load_state(out / "models" / n) for n in ("grpo", "sft", "instruct"))
    plus, minus = load_state(out / "models" / "instruct_plus_v"), \
        load_state(out / "models" / "instruct_minus_v")
    merged = load_state(out / "models" / "merge")
    for k in inst:
        v = grpo[k] - sft[k]
        torch.testing.assert_close(plus[k], inst[k] + v, rtol=0, atol=1e-6)
        torch.testing.assert_close(minus[k], inst[k] - v, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged[k], plus[k], rtol=0, atol=1e-6)
    pairwise = load_state(out / "models" / "pairwise")
    plus_pairwise = load_state(out / "models" / "instruct_plus_v_pairwise")
    for k in inst:
        torch.testing.assert_close(plus_pairwise[k], inst[k] + (pairwise[k] - sft[k]), rtol=0,
                                   atol=1e-6)


def test_sweep_in_memory_matches_the_models_written_by_add(quick_run):
    from reasoning_demo.evaluate import evaluate
    from reasoning_demo.stages import Context, test_examples

    out, output = quick_run
    recipe = make_recipe(quick=True)
    report = json.loads((out / "report.json").read_text())
    sweep = report["sweep"]
    assert [p["alpha"] for p in sweep["points"]] == list(recipe.alphas())
    assert sweep["items"] == {"arithmetic": recipe.sweep_items, "instruction": recipe.sweep_items}
    from reasoning_demo.stages import LOW_RANKS

    assert [p["rank"] for p in sweep["low_rank"]] == list(LOW_RANKS)  # each at α = 1
    assert all(p["alpha"] == 1.0 for p in sweep["low_rank"])
    for rank in LOW_RANKS:  # the compressed vectors are PEFT adapters of that rank
        config = json.loads((out / f"vector_r{rank}" / "adapter_config.json").read_text())
        assert config["r"] == rank
    assert "instruct + alpha·v" in output and (out / "eval" / "sweep.json").is_file()
    # no checkpoint written for any α: the models folder holds the pipeline's models only
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(
        ["init", "base", "sft", "grpo", "instruct", "instruct_plus_v", "instruct_minus_v",
         "merge", "wpo", "dpo", "judge", "pairwise", "instruct_plus_v_pairwise"])
    ctx = Context(out, recipe, True)
    points = {p["alpha"]: p for p in sweep["points"]}
    for alpha, model in ((0.0, "instruct"), (1.0, "instruct_plus_v"), (-1.0, "instruct_minus_v")):
        for task in ("arithmetic", "instruction"):
            ref = evaluate(out / "models" / model, test_examples(ctx, task)[:recipe.sweep_items],
                           recipe.max_new_tokens)
            assert points[alpha][task]["accuracy"] == 100 * ref["accuracy"], (alpha, task)
            if task == "arithmetic":
                assert points[alpha][task]["complete"] == 100 * ref["complete"], alpha


def test_rerun_reuses_finished_stages(quick_run):
    out, _ = quick_run
    before = (out / "report.json").read_text()
    result = CliRunner().invoke(main, ["demo", "--quick", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    stage_lines = [line for line in result.output.splitlines() if line.startswith("[")]
    assert stage_lines and all("reused" in line for line in stage_lines)
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(before)["rows"]


def test_stages_side_by_side_compute_what_they_compute_in_order(quick_run, tmp_path):
    """The quick run used two worker processes (this machine's default, stages as soon as
    their inputs are ready); one process running the stages in order gives the same report and
    the same weights."""
    from safetensors.torch import load_file

    out, output = quick_run
    assert "2 worker processes" in output.splitlines()[0]
    one = tmp_path / "one"
    result = CliRunner().invoke(main, ["demo", "--quick", "-q", "--workers", "1", "-o", str(one)])
    assert result.exit_code == 0, result.output
    a, b = (json.loads((d / "report.json").read_text()) for d in (out, one))
    for key in ("rows", "goals", "vector", "sweep", "judged"):
        assert a[key] == b[key], key
    for model in ("grpo", "pairwise", "wpo", "instruct_plus_v"):
        wa, wb = (load_file(d / "models" / model / "model.safetensors") for d in (out, one))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), model


def test_bad_recipe_override_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--quick", "-o", str(tmp_path / "o"),
                                       "--set", "grpo_stepz=3"])
    assert result.exit_code == 1
    assert "grpo_stepz" in result.output and "grpo_steps" in result.output
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(main, ["demo", "--quick", "-o", str(tmp_path / "o"),
                                       "--set", "flawed_share=2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "flawed_share must be in [0, 1], got 2.0" in result.output
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(main, ["demo", "--quick", "-o", str(tmp_path / "o"),
                                       "--set", "sweep_alphas=-1,x"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "sweep_alphas '-1,x': 'x' is not a number" in result.output
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(main, ["demo", "--quick", "-o", str(tmp_path / "o"),
                                       "--set", "pretrain_threads=0"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "pretrain_threads must be at least 1, got 0" in result.output
    assert not (tmp_path / "o").exists()


def test_a_changed_stage_reruns_with_what_depends_on_it(quick_run):
    out, _ = quick_run
    result = CliRunner().invoke(main, ["demo", "--quick", "-q", "-o", str(out),
                                       "--set", "wpo_beta=0.2"])
    assert result.exit_code == 0, result.output
    lines = {line.split("]")[0][1:]: line for line in result.output.splitlines()
             if line.startswith("[")}
    for reused in ("data", "base", "sft", "grpo", "instruct", "vector", "sweep", "pairs",
                   "eval sft arithmetic", "eval instruct+v arithmetic"):
        assert "reused" in lines[reused], lines[reused]
    for redone in ("wpo", "dpo", "eval wpo arithmetic", "eval dpo arithmetic"):
        assert "reused" not in lines[redone], lines[redone]


def test_refuses_a_folder_that_is_not_a_demo_folder(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    result = CliRunner().invoke(main, ["demo", "--quick", "--fresh", "-o", str(keep)])
    assert result.exit_code == 1 and "not a demo folder" in result.output
    assert (keep / "precious.txt").read_text() == "x"


def test_a_trainer_config_error_is_one_line(tmp_path):
    # 10 000 examples per SFT step cannot come from the 400 rows of the quick split
    result = CliRunner().invoke(main, ["demo", "--quick", "-q", "-o", str(tmp_path / "o"),
                                       "--set", "sft_batch=10000"])
    assert result.exit_code == 1, result.output
    assert "demo stage sft" in result.output and "batch_size" in result.output
    assert "Traceback" not in result.output


def test_quick_report_says_it_is_a_smoke_test(quick_run):
    _, output = quick_run
    assert output.count("smoke test of the pipeline") == 2  # above and below the table
    assert "its accuracies and goals mean nothing" in output


def test_a_stage_rerun_by_hand_reproduces_the_demos_weights(quick_run, tmp_path):
    # The README's hand rerun, `mergekit-rl train sft OUT/configs/sft.yaml`, in a process whose
    # torch uses another thread count than the demo's. The config carries the demo's
    # train.num_threads. (At --quick sizes torch gives the same bits on 1 or 2 threads, so
    # what this checks is that the written config reproduces the stage; that the threads are
    # applied is tests/trainers/test_cli.py::test_num_threads_is_applied_before_the_model.)
    out, _ = quick_run
    config = out / "configs" / "sft.yaml"
    import yaml

    assert yaml.safe_load(config.read_text())["train"]["num_threads"] == \
        make_recipe(quick=True).threads
    # the pretraining runs alone and takes both cores
    pretrain = yaml.safe_load((out / "configs" / "pretrain.yaml").read_text())
    assert pretrain["train"]["num_threads"] == make_recipe(quick=True).pretrain_threads == 2
    # tiny models: glibc keeps their freed blocks (the same maths, no page-fault churn)
    assert pretrain["train"]["cpu_malloc"] == "cached"
    assert yaml.safe_load(config.read_text())["train"]["cpu_malloc"] == "cached"
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = CliRunner().invoke(main, ["train", "sft", str(config), "-q", "--set",
                                           f"train.output_dir={tmp_path / 'sft'}"])
    finally:
        torch.set_num_threads(previous)
    assert result.exit_code == 0, result.output
    again, demo = load_state(tmp_path / "sft"), load_state(out / "models" / "sft")
    assert again.keys() == demo.keys() and all(torch.equal(again[k], demo[k]) for k in demo)
