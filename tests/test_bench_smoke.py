"""Fast checks of the benchmark scripts' arithmetic and wiring (the timed runs are by hand).

- the FLOP counter counts matmuls, convolutions and scan bodies exactly;
- both sides of the benchmark build the same architecture: our stack from ``bench/arch.py``
  has, component by component, the parameter count of diffusers' pipeline built from it;
- the report turns result lines into the right ratios and target verdicts.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from bench import flops, report


def test_flop_counter_counts_matmul_conv_and_scan():
    a = jax.ShapeDtypeStruct((3, 5, 7), jnp.float32)
    w = jax.ShapeDtypeStruct((7, 11), jnp.float32)
    assert flops.count_flops(lambda a, w: a @ w, a, w) == 2 * 3 * 5 * 7 * 11

    x = jax.ShapeDtypeStruct((2, 9, 9, 4), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count_flops(conv, x, k) == 2 * (2 * 5 * 5 * 6) * (3 * 3 * 4)

    def looped(a, w):
        def body(c, _):
            return c, jnp.sum(jax.jit(lambda u: u @ w)(a))
        return jax.lax.scan(body, 0.0, None, length=4)[1]
    assert flops.count_flops(looped, a, w) == 4 * 2 * 3 * 5 * 7 * 11


def test_our_stack_has_the_diffusers_architecture():
    import torch
    import diffusers  # noqa: F401 - the reference side must be installed
    from bench.anchor_diffusers_unclip import build, param_counts
    from bench.stack import count, our_configs, param_shapes

    theirs = param_counts(build("tiny", torch.float32, "cpu"))
    ours = param_shapes(our_configs("tiny", dtype="float32"))
    d = our_configs("tiny")["prior"]["embed_dim"]
    assert count(ours["clip"]) == theirs["text_encoder"]
    assert count(ours["prior"]) + 2 * d == theirs["prior"]  # + clip_mean, clip_std (our stats, not params)
    assert count(ours["decoder"]["unet"]) == theirs["decoder"]
    assert count(ours["decoder"]["text_proj"]) == theirs["text_proj"]
    assert count(ours["sr_first"]) == theirs["super_res_first"] == theirs["super_res_last"]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_ratios_and_verdicts(tmp_path):
    _write(tmp_path / "diffusers_eager.jsonl", [
        {"kind": "sampling", "batch": 8, "images_per_s": 2.0, "peak_mem_GB": 14.0},
        {"kind": "sampling", "batch": 32, "images_per_s": 3.0, "peak_mem_GB": 30.0}])
    _write(tmp_path / "diffusers_compile.jsonl", [{"kind": "sampling", "batch": 8, "images_per_s": 4.0}])
    _write(tmp_path / "ours_cold.jsonl", [
        {"kind": "flops", "tflop_per_image": 98.0, "ceiling_images_per_s": 10.0, "device_peak_tflops": 980.0},
        {"kind": "compile", "batch": 8, "total_s": 50.0},
        {"kind": "sampling", "batch": 8, "images_per_s": 5.0, "peak_mem_GB": 20.0},
        {"kind": "sampling", "batch": 32, "images_per_s": 6.3, "peak_mem_GB": 40.0},
        {"kind": "error", "what": "sampling batch 1", "error": "boom"}])
    _write(tmp_path / "ours_warm.jsonl", [
        {"kind": "compile", "batch": 8, "total_s": 7.0}, {"kind": "compile", "batch": 1, "total_s": 4.5},
        {"kind": "sampling", "batch": 8, "images_per_s": 5.0, "peak_mem_GB": 12.0},
        {"kind": "sampling", "batch": 32, "images_per_s": 6.0, "peak_mem_GB": 29.0}])
    _write(tmp_path / "train_prior.jsonl", [{"kind": "training", "batch": 512, "mfu": 0.45}])
    s = report.summarize(str(tmp_path))
    rows = {r["batch"]: r for r in s["sampling"]}
    assert rows[32]["ratio_vs_eager"] == 2.1 and rows[8]["ratio_vs_compile"] == 1.25
    assert rows[8]["ours_peak_mem_GB"] == 12.0  # the warm start's clean figure wins
    assert rows[32]["fraction_of_ceiling"] == 0.63
    t = s["targets"]
    assert t["ours / diffusers eager fp16 at batch 32 >= 2.0"][1] == "met"
    assert t["ours / diffusers torch.compile at batch 8 >= 1.3"][1] == "NOT met"
    assert t["peak memory <= diffusers eager, every batch"][1] == "met"
    assert t["compile, first run <= 60 s"] == (50.0, "met")
    assert t["compile, second process start <= 5 s"] == (4.5, "met")
    assert t["prior training MFU >= 50%"] == (0.45, "NOT met")
    assert t["decoder training MFU >= 40%"][1] == "open (not measured)"
    assert s["errors"] == [{"file": "ours_cold", "what": "sampling batch 1", "error": "boom"}]
    assert "| 32 | 6.3 |" in report.markdown(s)


def test_cpu_steal_share_from_proc_stat(tmp_path):
    from bench import common
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    before = common.cpu_times(str(stat))
    assert before == (100, 0, 50, 800, 10, 0, 0, 40, 0, 0)
    # 120 ticks pass: 60 user, 20 idle, 40 steal; guest counters (9th, 10th) stay out of the total
    stat.write_text("cpu  160 0 50 820 10 0 0 80 30 0\n")
    assert common.steal_share(before, common.cpu_times(str(stat))) == round(40 / 120, 3)
    assert common.steal_share(before, None) is None
    assert common.cpu_times(str(tmp_path / "missing")) is None

    # the same share measured around a block (the CPU benches' rounds)
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\n")
    with common.StealMeter(str(stat)) as steal:
        assert steal.share is None
        stat.write_text("cpu  160 0 50 820 10 0 0 80 30 0\n")
    assert steal.share == round(40 / 120, 3)
    with common.StealMeter(str(tmp_path / "missing")) as steal:
        pass
    assert steal.share is None


def test_torch_stage_seconds_splits_a_call_by_stage_and_restores_the_modules():
    """``bench.cpu_tiny --stages``, diffusers' side: each stage's module forwards are timed
    inside whole calls; the rest of the call is 'other'; the modules are left as found."""
    import time
    from types import SimpleNamespace

    from bench.cpu_tiny import TORCH_STAGES, torch_stage_seconds

    def module(seconds):
        return SimpleNamespace(forward=lambda *a, **k: time.sleep(seconds) or seconds)
    pipe = SimpleNamespace(**{name: module(0.0) for names in TORCH_STAGES.values() for name in names})
    pipe.decoder, pipe.prior = module(0.1), module(0.05)
    forwards = {name: getattr(pipe, name).forward for names in TORCH_STAGES.values() for name in names}

    def run():  # the pipeline: prior once, decoder twice, 0.1 s of its own work
        pipe.prior.forward()
        pipe.decoder.forward()
        pipe.decoder.forward()
        time.sleep(0.1)
    seconds = torch_stage_seconds(pipe, run, reps=2)
    assert set(seconds) == set(TORCH_STAGES) | {"other"}
    # lower bounds exact (sleep never returns early), upper bounds with room for a loaded machine
    assert 0.2 <= seconds["decoder"] < 0.3 and 0.05 <= seconds["prior"] < 0.1
    assert 0.1 <= seconds["other"] < 0.2 and seconds["super_res"] < 0.05
    assert all(getattr(pipe, name).forward is f for name, f in forwards.items())


def test_shapes_prior_probe_reads_variants():
    from bench.shapes_prior_probe import parse_variant
    assert parse_variant("true") == ("true", {})
    assert parse_variant("prompt:prior_guidance=4.0,best_of_n=8") == ("prompt", {"prior_guidance": 4.0, "best_of_n": 8})
    for bad in ("prior", "prompt:best_of_n"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_shapes_x0_probe_on_the_shipped_model(capsys):
    """The probe runs on the shipped decoder; at t = 50 its x̂_0 background is near the truth."""
    import json

    from bench.shapes_x0_probe import main
    main(["--num=4", "--timesteps=999,50"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["n"] == 4 and lines[0]["true_border_chroma"] < 30
    assert [row["t"] for row in lines[1:]] == [999, 50]
    assert lines[2]["border_colour_error"] < 5 and lines[2]["x0_mse"] < 0.01


def test_shapes_upsampler_probe_on_the_shipped_model(capsys):
    """The probe runs on the shipped upsampler; the bilinear baseline keeps every attribute."""
    import json

    from bench.shapes_upsampler_probe import main
    main(["--num=4", "--steps=2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["variant"], r["upsampler_steps"]) for r in rows] == [("bilinear resize", None),
                                                                    ("learned upsampler", 2)]
    assert all(rows[0][k] == 1.0 for k in ("color", "shape", "size", "position"))
    assert all(0.0 <= rows[1][k] <= 1.0 for k in ("color", "shape", "size", "position"))


def test_shapes_color_probe_on_the_shipped_model(capsys):
    """The probe samples with each variant's overrides and breaks its colour errors down."""
    import json

    from bench.shapes_color_probe import main
    with pytest.raises(ValueError, match="not key=value"):
        main(["--num=2", "decoder_best_of_n"])
    main(["--num=2", "decoder_best_of_n=1,decoder_steps=2,prior_steps=2,upsampler_steps=2"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["n"] == 2 and 0.0 <= row["color"] <= 1.0
    errors = row["color_errors"]
    assert sum(errors["objects"].values()) >= 2 and set(errors) >= {"missed", "wrong", "took_other_object_color"}


def test_shapes_binding_probe_swaps_whole_words_and_runs(capsys):
    import json

    from bench.shapes_binding_probe import main, swap_words
    assert swap_words("a large red circle above a small blue square", "red", "blue") == \
        "a large blue circle above a small red square"
    assert swap_words("a small circle above a large square", "large", "small") == \
        "a large circle above a small square"
    main(["--num=12", "--generated"])
    row = json.loads(capsys.readouterr().out)
    assert row["n_examples"] == 12 and row["color"]["n"] >= 3
    assert all(0.0 <= row[a]["true_caption_wins"] <= 1.0 for a in ("color", "shape") if a in row)
    groups = row["generated"]
    assert groups["n"] == row["color"]["n"]
    assert sum(g["n"] for k, g in groups.items() if k != "n") <= groups["n"]


def test_shapes_clip_probe_on_the_shipped_model(capsys):
    import json

    from bench.shapes_clip_probe import main
    main(["--num=60", "--num_train=300"])
    row = json.loads(capsys.readouterr().out)
    assert row["num_train"] == 300
    for split in ("test", "heldout"):
        assert row[split]["n"] == 60
        assert set(row[split]["zero_shot_by_size"]) == {"small", "large"}
        assert all(0.0 <= row[split][k] <= 1.0 for k in ("zero_shot", "linear_probe"))
    # The shipped CLIP carries shape on seen colour-shape pairs (README: linear probe 97% on 600).
    assert row["test"]["linear_probe"] >= 0.8, row


def test_training_bench_runs_a_stage_config_file(tmp_path):
    """``bench.training --config-file``: the shapes recipe's decoder config (tiny here) times
    its optimizer step and reports the achieved FLOP rate, the figure to compare on a CPU."""
    from bench import training
    out = tmp_path / "train.jsonl"
    training.main(["--stage", "decoder", "--config-file", "configs/shapes_decoder.py:tiny", "--batch", "2",
                   "--steps", "1", "--warmup", "1", "--out", str(out)])
    records = [json.loads(line) for line in open(out)]
    run = next(r for r in records if r["kind"] == "training")
    assert run["batch"] == 2 and run["sec_per_step"] > 0 and run["achieved_tflops"] > 0
    assert next(r for r in records if r["kind"] == "setup")["setting"] == "train decoder configs/shapes_decoder.py:tiny"


def test_sampling_bench_times_the_tiny_cascade_and_splits_its_compile(tmp_path):
    """``bench.sampling`` at tiny size on CPU: the whole cascade compiles and makes finite images;
    ``--compile-by-stage`` compiles its four stages one by one."""
    from bench import sampling
    out = tmp_path / "ours.jsonl"
    common = ["--size", "tiny", "--dtype", "float32", "--param-dtype", "float32", "--batches", "1",
              "--out", str(out)]
    sampling.main(common + ["--reps", "1", "--no-flops"])
    sampling.main(common + ["--compile-by-stage"])
    records = [json.loads(line) for line in open(out)]
    run = next(r for r in records if r["kind"] == "sampling")
    assert run["finite"] and run["shape"] == [1, 64, 64, 3] and run["images_per_s"] > 0
    stages = next(r for r in records if r["kind"] == "stage_compile")["stages"]
    assert list(stages) == ["clip_text", "prior", "decoder", "super_res"]
    assert all(s["compile_s"] > 0 for s in stages.values())
