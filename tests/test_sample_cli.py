"""sample.py end to end on the converted tiny Karlo pipeline, its input checks, and the
same images for the same seed on 1 and 8 (fake CPU) devices and in two processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.subprocesses import assert_same_pictures, run_two_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--prior_steps=2", "--decoder_steps=2", "--upsampler_steps=2"]


def _run(args, env=None, timeout=600):
    # no persistent compilation cache: the tests leave nothing in ~/.cache
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--compilation_cache="] + args,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_sample_writes_images_grid_and_manifest(tiny_karlo, tmp_path):
    out = tmp_path / "out"
    # An unwritable cache directory (nothing can be made under /proc): sampling goes on without.
    proc = _run([f"--checkpoint={tiny_karlo[2]}", "--prompt=a red horse", "--prompt=a blue square",
                 "--num_images=2", "--seed=3", f"--out={out}", "--compilation_cache=/proc/unclip_jax_cache"] + FAST)
    assert proc.returncode == 0, proc.stderr
    assert "no persistent compilation cache" in proc.stderr
    manifest = json.load(open(out / "manifest.json"))
    assert [e["prompt"] for e in manifest["images"]] == ["a red horse"] * 2 + ["a blue square"] * 2
    assert manifest["settings"]["decoder_steps"] == 2 and manifest["images"][0]["seed"] == 3
    first = np.asarray(Image.open(out / manifest["images"][0]["file"]))
    assert first.shape == (64, 64, 3)
    assert os.path.exists(out / "grid.png")
    # Two images of one prompt differ (per-example noise); compile time is reported apart.
    second = np.asarray(Image.open(out / manifest["images"][1]["file"]))
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 1
    assert "of which compile" in proc.stderr


def test_dtype_and_attention_flags(tiny_karlo, tmp_path):
    """--dtype/--attention replace every network's saved compute settings: bfloat16 with
    splash attention (interpreted on CPU) still makes the pictures."""
    out = tmp_path / "out"
    proc = _run([f"--checkpoint={tiny_karlo[2]}", "--prompt=a red horse", "--seed=3", f"--out={out}",
                 "--dtype=bfloat16", "--attention=splash"] + FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.load(open(out / "manifest.json"))
    image = np.asarray(Image.open(out / manifest["images"][0]["file"]))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert manifest["settings"]["dtype"] == "bfloat16" and manifest["settings"]["attention"] == "splash"
    proc = _run([f"--checkpoint={tiny_karlo[2]}", "--prompt=x", "--attention=flash"])
    assert proc.returncode != 0 and "--attention" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    ([], "no prompt"),
    (["--prompt=x", "--decoder_guidance=-2"], "decoder_guidance"),
    (["--prompt=x", "--prior_steps=0"], "prior_steps"),
    (["--prompt=x", "--decoder_steps=5000"], "decoder_steps"),
    (["--variations_of=/no/such/image.png"], "does not exist"),
    (["--prompt=x", "--config.decoder_stpes=3"], "unknown config key 'decoder_stpes'"),
    (["--prompt=x", "--config.batch_size=0"], "batch_size"),
    (["--prompt=x", "--out=sample.py"], "is not a directory"),
    (["--prompt=x", "--interpolate=a red horse,a blue square"], "do not go with"),
    (["--interpolate=a red horse,a blue square", "--num_images=1"], "num_images >= 2"),
    (["--interpolate=a red horse,missing.bmp"], "not one of each"),
    (["--variations_of=bench/results/shapes_samples.png"], "no image tower"),
    (["--prompt=x", "--decoder_best_of_n=2"], "image tower"),
])
def test_sample_rejects_bad_input(tiny_karlo, args, message):
    proc = _run([f"--checkpoint={tiny_karlo[2]}"] + args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "of which compile" not in proc.stderr  # failed before any sampling


def test_sample_rejects_unreadable_image_and_bad_checkpoint(tiny_karlo, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    proc = _run([f"--checkpoint={tiny_karlo[2]}", f"--variations_of={bad}"])
    assert proc.returncode != 0 and "cannot read image" in proc.stderr
    proc = _run([f"--checkpoint={tmp_path}", "--prompt=x"])
    assert proc.returncode != 0 and "not a pipeline directory" in proc.stderr
    # A checkpoint whose stages do not fit: the prior claims another embedding width.
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_karlo[2], broken)
    cfg_path = broken / "prior" / "config.json"
    cfg = json.load(open(cfg_path))
    cfg["embed_dim"] = 48
    json.dump(cfg, open(cfg_path, "w"))
    proc = _run([f"--checkpoint={broken}", "--prompt=x"])
    assert proc.returncode != 0 and "do not fit" in proc.stderr, proc.stderr[-2000:]
    # A truncated weights file and a manifest that is not JSON: messages, not tracebacks.
    # (The shipped shapes pipeline: its weights are safetensors files.)
    truncated = tmp_path / "truncated"
    shutil.copytree(os.path.join(ROOT, "unclip_jax", "assets", "shapes_pipeline"), truncated)
    weights = truncated / "decoder" / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = _run([f"--checkpoint={truncated}", "--prompt=x"])
    assert proc.returncode != 0 and "cannot load pipeline" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (truncated / "pipeline.json").write_text("{ not json")
    proc = _run([f"--checkpoint={truncated}", "--prompt=x"])
    assert proc.returncode != 0 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr


_DEVICES_SCRIPT = """
import sys, numpy as np
from unclip_jax import parallel
if len(sys.argv) > 4:  # PORT PROCESS_ID: one of two processes on localhost
    assert parallel.init_distributed(f"localhost:{sys.argv[4]}", 2, int(sys.argv[5]))
import jax
from unclip_jax.pipeline import load_pipeline
pipe = load_pipeline(sys.argv[1])
assert jax.device_count() == int(sys.argv[3]), jax.device_count()
out = pipe.text_to_image(["a red horse", "a blue square", "a small circle", "a green tree"], 11,
                         prior_steps=2, decoder_steps=2, upsampler_steps=2)
np.save(sys.argv[2], out["images"])
"""


def test_same_seed_same_images_on_1_and_8_devices_and_two_processes(tiny_karlo, tmp_path):
    def command(path, devices, *extra):
        return [sys.executable, "-c", _DEVICES_SCRIPT, tiny_karlo[2], path, str(devices), *extra]

    results = []
    for n in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        path = str(tmp_path / f"images_{n}.npy")
        proc = subprocess.run(command(path, n), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(np.load(path))
    assert results[0].shape == (4, 64, 64, 3)
    # Batch padding differs (4 vs 8 rows) and the batch is split over devices: same pictures.
    assert_same_pictures(results[1], results[0])

    # Two processes with 2 devices each (a multi-host TPU slice in miniature), 4 prompts on
    # 4 devices: no padding row, so each stage's output is split over the processes and each
    # process holds only its devices' rows; the pipeline has to gather them.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    paths = [str(tmp_path / f"images_process{i}.npy") for i in range(2)]
    run_two_processes(lambda port, i: command(paths[i], 4, port, str(i)), env)
    for path in paths:
        assert_same_pictures(np.load(path), results[0])


def test_prompts_file_interpolation_and_variations_with_the_shipped_model(tmp_path):
    """The three modes on the default checkpoint (the shipped shapes model, whose CLIP has an
    image tower), a few steps each."""
    fast = FAST + ["--decoder_best_of_n=1"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n\n  a small blue square at the top  \n")
    out = tmp_path / "file"
    proc = _run([f"--prompts_file={prompts}", f"--out={out}"] + fast)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.load(open(out / "manifest.json"))
    assert [e["prompt"] for e in manifest["images"]] == ["a red circle on the left", "a small blue square at the top"]
    assert manifest["settings"]["checkpoint"].endswith(os.path.join("assets", "shapes_pipeline"))

    out = tmp_path / "interpolation"
    proc = _run(["--interpolate=a red circle,a blue square", "--num_images=3", f"--out={out}"] + fast)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = json.load(open(out / "manifest.json"))["images"]
    assert [e["theta"] for e in frames] == [0.0, 0.5, 1.0]
    first, last = (np.asarray(Image.open(out / e["file"])).astype(int) for e in (frames[0], frames[-1]))
    assert first.shape == (64, 64, 3) and np.abs(first - last).mean() > 1  # two prompts, two pictures

    picture = tmp_path / "file" / json.load(open(tmp_path / "file" / "manifest.json"))["images"][0]["file"]
    out = tmp_path / "variations"
    proc = _run([f"--variations_of={picture}", "--num_images=2", f"--out={out}"] + fast)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = json.load(open(out / "manifest.json"))["images"]
    assert len(images) == 2 and all(e["variation_of"] == str(picture) for e in images)
