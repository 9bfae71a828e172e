"""The shapes recipe end to end at its ``--tiny`` size: trains clip → prior → decoder →
upsampler for a few steps, exports a pipeline that loads and samples (also through
``sample.py``), and writes a report with every field. Quality is not checked here (a few
steps of tiny models); ``unclip_jax/recipe.py`` documents the real run."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("clip", "prior", "decoder", "upsampler")


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    from unclip_jax import recipe
    workdir = str(tmp_path_factory.mktemp("recipe"))
    report = recipe.run(workdir, tiny=True, num_prompts=4)
    return workdir, report


def test_report_has_every_field(recipe_dir):
    workdir, report = recipe_dir
    on_disk = json.load(open(os.path.join(workdir, "report.json")))
    assert on_disk["tiny"] is True and on_disk["num_prompts"] == 4
    for stage in STAGES:
        entry = on_disk["training"][stage]
        assert entry["steps"] == 4 and entry["batch_size"] == 8 and entry["train_s"] > 0
    assert math.isclose(on_disk["total_training_s"], sum(on_disk["training"][s]["train_s"] for s in STAGES))
    for key in ("zero_shot_color_heldout", "zero_shot_shape_heldout", "zero_shot_color_test",
                "zero_shot_shape_test"):
        assert 0.0 <= on_disk["clip"][key] <= 1.0
    for key in ("cos_pred_image", "cos_pred_unrelated_image", "cos_pred_text", "eval_loss"):
        assert math.isfinite(on_disk["prior"][key])
    oracle = on_disk["oracle"]
    assert oracle["n"] == 4 and oracle["heldout"]["n"] == 2 and oracle["seen"]["n"] == 2
    for key in ("color", "shape", "size", "position", "count", "overall"):
        assert 0.0 <= oracle[key] <= 1.0
    assert set(on_disk["targets_met"]) == {"color", "shape", "size", "position", "clip_zero_shot_color",
                                           "clip_zero_shot_shape", "prior_above_baseline"}
    true_z = on_disk["oracle_true_embeddings"]  # decoder + upsampler from test images' z_i
    assert true_z["n"] == 8 and all(0.0 <= true_z[key] <= 1.0 for key in ("color", "shape", "size", "position"))
    assert on_disk["sampling_s"] > 0 and on_disk["machine"]["cpu_count"] >= 1
    assert on_disk["sampling_settings"]["decoder_steps"] == 5  # from configs/shapes_decoder.py:tiny
    assert os.path.exists(os.path.join(workdir, "samples.png"))


def test_exported_pipeline_loads_and_samples_64px(recipe_dir):
    from unclip_jax.pipeline import load_pipeline
    workdir, _ = recipe_dir
    pipe = load_pipeline(os.path.join(workdir, "pipeline"))
    assert pipe.prior_params is not None and pipe.decoder_params is not None and len(pipe.upsamplers) == 1
    # The shapes tokenizer: each caption word is one token.
    ids = pipe.tokenize(["a small purple triangle at the top"]).input_ids[0]
    assert int(np.sum(ids != 0)) == 2 + 7
    # As many prompts as the recipe sampled, with the default steps: its compiled samplers serve.
    out = pipe.text_to_image(["a red circle on the left", "a blue square", "a small yellow circle",
                              "a big orange square at the top"], seed=1)
    assert out["images"].shape == (4, 64, 64, 3) and out["images"].dtype == np.uint8
    assert out["stopped_at"] == "upsampler_0"
    # The prior's z_i have the norm of the CLIP image embeddings the decoder trained on
    # (its 'l2' space forgets it: unit vectors decoded 10-18 points worse, session 7).
    from unclip_jax.data import shapes
    images = shapes.make_batch("train", 0, 256, image_size=pipe.clip_config.vision.image_size)["image"]
    trained_norm = float(np.linalg.norm(np.asarray(pipe.encode_image(list(images))), axis=1).mean())
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=1), trained_norm, rtol=0.05)
    # The stage configs name the pipeline's own CLIP, not the training workdir's paths.
    for stage in ("prior", "decoder"):
        trained, exported = (_read_json(os.path.join(workdir, d, "config.json")) for d in (stage, f"pipeline/{stage}"))
        assert exported["clip"] == {**trained["clip"], "path": "clip", "tokenizer": "tokenizer"}
        assert trained["clip"]["path"] != "clip"


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def test_stages_are_finished_and_resumable(recipe_dir):
    from unclip_jax import recipe
    workdir, _ = recipe_dir
    for stage in STAGES:
        assert recipe._finished(os.path.join(workdir, stage), 4)
        assert not recipe._finished(os.path.join(workdir, stage), 5)  # a longer run would continue


def test_export_cli_rejects_wrong_directories(recipe_dir, tmp_path):
    from unclip_jax.export import ExportError, read_stage
    workdir, _ = recipe_dir
    with pytest.raises(ExportError, match="not a training work directory"):
        read_stage(str(tmp_path), "clip")
    with pytest.raises(ExportError, match="holds a 'prior' run, expected 'decoder'"):
        read_stage(os.path.join(workdir, "prior"), "decoder")


def test_float16_export_is_compact_and_samples_alike(recipe_dir, tmp_path):
    """The recipe exports float16 safetensors (how the package ships its default): the
    parameters are the float32 (orbax) export's within float16 rounding, the images alike."""
    import jax
    from unclip_jax.export import main as export_main
    from unclip_jax.pipeline import load_pipeline
    workdir, _ = recipe_dir
    shipped = os.path.join(workdir, "pipeline")
    assert os.path.isfile(os.path.join(shipped, "decoder", "params.safetensors"))
    assert not os.path.exists(os.path.join(shipped, "decoder", "params"))
    out = str(tmp_path / "fp32")
    export_main([f"--clip={workdir}/clip", f"--prior={workdir}/prior", f"--decoder={workdir}/decoder",
                 f"--upsampler={workdir}/upsampler", f"--tokenizer={workdir}/tokenizer", f"--out={out}"])
    assert os.path.isdir(os.path.join(out, "decoder", "params"))  # orbax by default
    full, half = load_pipeline(out), load_pipeline(shipped)
    for name in ("clip_params", "prior_params", "decoder_params"):
        a, b = getattr(full, name), getattr(half, name)
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), name
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert np.asarray(y).dtype == np.float32 and np.shape(y) == np.shape(x)
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-7)
    prompts = ["a red circle on the left", "a blue square", "a small yellow circle",
               "a big orange square at the top"]  # the batch another test compiled for
    a = full.text_to_image(prompts, seed=3)["images"].astype(int)
    b = half.text_to_image(prompts, seed=3)["images"].astype(int)
    assert np.abs(a - b).mean() < 3.0


def test_score_only_mode_writes_the_sample_scores(recipe_dir, tmp_path):
    from unclip_jax.recipe import main as recipe_main
    workdir, report = recipe_dir
    out = tmp_path / "scores.json"
    recipe_main([f"--score={workdir}/pipeline", "--num_prompts=4", "--num_true=8", f"--out={out}"])
    scores = json.load(open(out))
    assert scores["num_prompts"] == 4 and scores["oracle_true_embeddings"]["n"] == 8
    # the same pipeline, prompts and seed as the recipe's own evaluation: the same scores
    for key in ("oracle", "oracle_true_embeddings"):  # as JSON: NaN (no held-out examples) == NaN
        assert json.dumps(scores[key], sort_keys=True) == json.dumps(report[key], sort_keys=True), key
    assert scores["sampling_settings"] == report["sampling_settings"]
    with pytest.raises(SystemExit):
        recipe_main(["--num_prompts=4"])  # neither --workdir nor --score


@pytest.mark.parametrize("score, out, message", [
    ("{workdir}/pipeline", "{tmp}/missing/scores.json", "not a file in an existing directory"),
    ("{workdir}/pipeline", "{tmp}", "not a file in an existing directory"),
    ("{workdir}", "", "not an exported pipeline"),
])
def test_score_only_mode_refuses_bad_paths_before_sampling(recipe_dir, tmp_path, capsys, score, out, message):
    from unclip_jax.recipe import main as recipe_main
    args = [f"--score={score.format(workdir=recipe_dir[0])}"]
    if out:
        args.append(f"--out={out.format(tmp=tmp_path)}")
    with pytest.raises(SystemExit):
        recipe_main(args)
    captured = capsys.readouterr()
    assert message in captured.err and "oracle" not in captured.out


def test_export_base_replaces_only_the_given_stage(recipe_dir, tmp_path):
    """``--base``: a pipeline with one stage swapped for a training run's; the rest, the
    tokenizer and the other stages' sampling defaults stay the base's."""
    import jax
    from unclip_jax.export import ExportError, export
    from unclip_jax.export import main as export_main
    from unclip_jax.pipeline import load_pipeline
    workdir, _ = recipe_dir
    base_dir = os.path.join(workdir, "pipeline")
    base_json = json.load(open(os.path.join(base_dir, "pipeline.json")))
    # A base whose decoder and prior defaults differ from the stage configs', so that replacing
    # the decoder visibly takes the decoder's defaults and keeps the prior's.
    edited = str(tmp_path / "edited_base")
    export(edited, None, None, None, [], None, base=base_dir)
    manifest = json.load(open(os.path.join(edited, "pipeline.json")))
    manifest["defaults"].update(decoder_steps=11, prior_steps=13)
    json.dump(manifest, open(os.path.join(edited, "pipeline.json"), "w"))

    out = str(tmp_path / "swapped")
    export_main([f"--base={edited}", f"--decoder={workdir}/decoder", f"--out={out}", "--storage_dtype=float32"])
    with pytest.raises(SystemExit, match="error: "):  # a tokenizer that is not there: a message
        export_main([f"--clip={workdir}/clip", f"--tokenizer={tmp_path}/no_tokenizer", f"--out={tmp_path}/bad"])
    swapped, base = load_pipeline(out), load_pipeline(edited)
    defaults = json.load(open(os.path.join(out, "pipeline.json")))["defaults"]
    assert defaults["decoder_steps"] == base_json["defaults"]["decoder_steps"] == 5  # the decoder config's
    assert defaults["prior_steps"] == 13                                             # kept from the base
    for name in ("clip_params", "prior_params"):
        for x, y in zip(jax.tree_util.tree_leaves(getattr(swapped, name)), jax.tree_util.tree_leaves(getattr(base, name))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(swapped.upsamplers) == 1
    assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == sorted(os.listdir(os.path.join(base_dir, "tokenizer")))
    with pytest.raises(ExportError, match="--out must differ from --base"):
        export(edited, None, None, None, [], None, base=edited)
    with pytest.raises(ExportError, match="needs --clip and --tokenizer"):
        export(str(tmp_path / "x"), None, f"{workdir}/prior", None, [], None)


def test_runs_without_a_recorded_l2_norm(recipe_dir, tmp_path):
    """A prior run from before ``prior.l2_norm`` was recorded: export measures it (as
    training does), and a pipeline still missing it warns instead of silently decoding
    unit vectors."""
    import shutil
    from unclip_jax.export import with_l2_norm
    from unclip_jax.pipeline import load_pipeline
    workdir, _ = recipe_dir
    trained = _read_json(os.path.join(workdir, "prior", "config.json"))
    assert trained["prior"]["embed_norm"] == "l2" and trained["prior"]["l2_norm"] > 0
    old = {**trained, "prior": {k: v for k, v in trained["prior"].items() if k != "l2_norm"}}
    assert with_l2_norm(old)["prior"]["l2_norm"] == pytest.approx(trained["prior"]["l2_norm"], rel=1e-4)
    assert with_l2_norm(trained) is trained

    pipeline = str(tmp_path / "pipeline")
    shutil.copytree(os.path.join(workdir, "pipeline"), pipeline)
    config_path = os.path.join(pipeline, "prior", "config.json")
    exported = _read_json(config_path)
    del exported["prior"]["l2_norm"]
    json.dump(exported, open(config_path, "w"))
    with pytest.warns(UserWarning, match="unit vectors"):
        load_pipeline(pipeline)


def test_sample_py_runs_on_the_exported_pipeline(recipe_dir, tmp_path):
    workdir, _ = recipe_dir
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), f"--checkpoint={os.path.join(workdir, 'pipeline')}",
         "--prompt=a large green square at the bottom", "--num_images=1", f"--out={out}",
         "--prior_steps=2", "--decoder_steps=2", "--upsampler_steps=2"],
        cwd=ROOT, env={**os.environ, "UNCLIP_JAX_CACHE": str(tmp_path / "xla_cache")},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["images"][0]["prompt"] == "a large green square at the bottom"
    assert np.asarray(Image.open(out / manifest["images"][0]["file"])).shape == (64, 64, 3)


def test_vocabulary_covers_every_caption():
    from unclip_jax.data import shapes
    from unclip_jax.recipe import shapes_vocabulary
    words = set(shapes_vocabulary())
    for i in range(300):
        caption = shapes.generate_example(0, "train", i, 16)["caption"]
        assert set(caption.replace(",", " ").split()) <= words, caption


def test_steps_override_parsing():
    from unclip_jax.recipe import parse_steps
    assert parse_steps("clip:10,decoder:20") == {"clip": 10, "decoder": 20}
    assert parse_steps("") == {}
    with pytest.raises(ValueError, match="STAGE:N"):
        parse_steps("vae:10")


def test_finetune_legs_continue_from_the_recipe(recipe_dir, tmp_path):
    """``--finetune``: each leg trains one stage from the previous pipeline's weights (with
    that pipeline's CLIP) and replaces only that stage; the base stages are not retrained."""
    import shutil

    import jax
    from unclip_jax import recipe
    from unclip_jax.pipeline import load_pipeline
    base_workdir, base_report = recipe_dir
    workdir = str(tmp_path / "recipe")
    shutil.copytree(base_workdir, workdir)
    report = recipe.run(workdir, tiny=True, num_prompts=4, finetune=True)

    final = os.path.join(workdir, "pipeline_finetuned")
    assert report["finetune"] is True and report["pipeline"] == final
    assert report["training"]["decoder"] == base_report["training"]["decoder"]  # not retrained
    names = [leg[0] for leg in recipe.FINETUNE_LEGS]
    assert names == ["decoder_ft", "decoder_ft2", "clip_unnamed", "prior_ft", "decoder_ft3", "decoder_ft4"]
    for name in names:
        assert report["training"][name]["steps"] == recipe.TINY_LEG_STEPS
        assert recipe._finished(os.path.join(workdir, name), recipe.TINY_LEG_STEPS)
    assert math.isclose(report["total_training_s"], sum(e["train_s"] for e in report["training"].values()))

    previous = os.path.join(workdir, "pipeline")
    for name, stage, _, overrides in recipe.FINETUNE_LEGS:
        config = json.load(open(os.path.join(workdir, name, "config.json")))
        assert config["train"]["init_from"] == os.path.join(previous, stage)
        if stage != "clip":
            assert config["clip"]["path"] == os.path.join(previous, "clip")
        for override in overrides:  # the leg's data settings; schedule ones stay tiny
            key, value = override.split("=")
            section, field = key.split(".")
            if key not in recipe._FULL_SIZE_ONLY:
                assert config[section][field] == pytest.approx(float(value)), (name, key)
        previous = os.path.join(workdir, "legs", name)

    # The final pipeline: new CLIP, prior and decoder; the recipe's upsampler unchanged.
    tuned, base = load_pipeline(final), load_pipeline(os.path.join(workdir, "pipeline"))
    for name in ("clip_params", "prior_params", "decoder_params"):
        changed = [not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                   zip(jax.tree_util.tree_leaves(getattr(tuned, name)), jax.tree_util.tree_leaves(getattr(base, name)))]
        assert any(changed), name
    for x, y in zip(jax.tree_util.tree_leaves(tuned.upsamplers[0].params_first),
                    jax.tree_util.tree_leaves(base.upsamplers[0].params_first)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert 0.0 <= report["oracle"]["color"] <= 1.0 and 0.0 <= report["clip"]["zero_shot_shape_heldout"] <= 1.0
