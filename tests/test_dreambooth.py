"""The DreamBooth recipe end to end on a tiny offline Stable Diffusion (recipes/dreambooth_tiny.py), CPU only.

Covers: the smoke config, loading the saved adapter into a StableDiffusionPipeline (reproducing the training-time
validation images; merged == unmerged), dreambooth_infer.py, prior preservation with generated class images
(v-prediction model, text-encoder adapter, conv targets), resume == uninterrupted, eval_subject.py on tiny CLIP / DINO
models, 2-process (gloo) runs (plain, Top-K compressed gradients of two models, compressed local steps with a resume),
the benchmark's quick mode, and the recipe's error messages.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from common.diffusion import adapter_dirs, generate_images, load_adapter

import dreambooth
from common import dreambooth_data as dreambooth_common
from common import dreambooth_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]

SMOKE = REPO_ROOT / "configs" / "dreambooth" / "smoke.yaml"
FAST = ["--max_train_steps", "6", "--validation_steps", "0", "--checkpointing_steps", "0", "--num_validation_images", "1",
        "--validation_prompts", "[a photo of sks disc]", "--validation_inference_steps", "2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dreambooth_assets")
    model, instance = root / "tiny-sd", root / "instance"
    dreambooth_tiny.ensure_smoke_assets(model, instance)
    return {"root": root, "model": model, "instance": instance}


def run(assets: dict[str, Path], out: Path, *extra: str, instance: Path | None = None) -> dict:
    """The smoke config on the shared tiny model (no asset creation: an empty instance directory stays empty)."""
    argv = ["--config", str(SMOKE), "--pretrained_model_name_or_path", str(assets["model"]), "--smoke_assets", "false",
            "--instance_data_dir", str(instance or assets["instance"]), "--output_dir", str(out), *extra]
    return dreambooth.main(argv)


def error(assets: dict[str, Path], out: Path, *extra: str, instance: Path | None = None) -> str:
    """The recipe's error for these options: one line ``dreambooth: error: ...`` (SystemExit); no new --output_dir."""
    with pytest.raises(SystemExit) as info:
        run(assets, out, *extra, instance=instance)
    message = str(info.value.code)
    assert message.startswith("dreambooth: error: ") and "\n" not in message, message
    assert not out.exists()
    return message


def launch2(assets: dict[str, Path], out: Path, *extra: str) -> dict:
    """The smoke config with FAST settings as one 2-process gloo job (`accelerate launch --multi_gpu`); its results."""
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(REPO_ROOT / "recipes" / "dreambooth.py"), "--config", str(SMOKE), "--smoke_assets",
           "false", "--pretrained_model_name_or_path", str(assets["model"]), "--instance_data_dir",
           str(assets["instance"]), "--output_dir", str(out), "--progress_bar", "false", *FAST, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # The timeout guards against a hung process group; it is not a time limit (a loaded machine is slow).
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results_file = out / "results.json"
    return json.loads(results_file.read_text()) if results_file.is_file() else {}


def pipeline(model_dir: Path, scheduler: str = "DPMSolverMultistepScheduler"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    return dreambooth_common.set_scheduler(pipe, scheduler)


def sample_like_validation(pipe, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with the run's validation settings, and the run's own final validation images."""
    saved = torch.load(out / dreambooth.VALIDATION_DIR / dreambooth.FINAL_IMAGES)
    cfg = json.loads((out / "run_config.json").read_text())
    images = generate_images(
        pipe, saved["prompts"], seed=saved["seed"], num_images_per_prompt=cfg["num_validation_images"],
        num_inference_steps=cfg["validation_inference_steps"], guidance_scale=cfg["validation_guidance_scale"],
        height=cfg["resolution"], width=cfg["resolution"],
    )
    return images, saved["images"]


# ----------------------------------------------------------------------------------------------------------------------
# Smoke run, loading, merging, inference
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke config as shipped (assets created by the recipe itself), in a temporary directory."""
    root = tmp_path_factory.mktemp("dreambooth_smoke")
    out = root / "run"
    results = dreambooth.main(["--config", str(SMOKE), "--pretrained_model_name_or_path", str(root / "assets" / "tiny-sd"),
                               "--instance_data_dir", str(root / "assets" / "instance"), "--output_dir", str(out)])
    assert results["finished"]
    return out


def test_smoke_run_outputs(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    for key in ("method", "trainable_params", "train_steps", "train_runtime_s", "step_time_s_median", "peak_memory_mb"):
        assert results[key] is not None, key
    assert results["method"] == "gsoft" and results["train_steps"] == 20
    assert 0 < results["trainable_params"] < results["total_params"]
    assert (smoke_run / "unet" / "adapter_config.json").is_file()
    assert json.loads((smoke_run / "unet" / "adapter_config.json").read_text())["peft_type"] == "GSOFT"
    grids = sorted(p.name for p in (smoke_run / "validation").glob("*.png"))
    assert grids == ["final_step_000020.png", "step_000010.png"]
    from PIL import Image

    assert Image.open(smoke_run / "validation" / "final_step_000020.png").size[0] > 32
    logged = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 15, 20] and all(r["loss"] > 0 for r in logged)
    assert sorted(p.name for p in (smoke_run / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]


def test_adapter_reproduces_validation_images(smoke_run: Path) -> None:
    from peft import PeftModel

    model_dir = smoke_run.parent / "assets" / "tiny-sd"
    pipe = pipeline(model_dir)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, smoke_run / "unet")  # the README's one-liner
    images, saved = sample_like_validation(pipe, smoke_run)
    assert images.shape == saved.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images, saved, atol=1e-5, rtol=0)
    base, _ = sample_like_validation(pipeline(model_dir), smoke_run)
    assert (base - saved).abs().max() > 1e-3  # the adapter changed something


def test_merged_matches_unmerged(smoke_run: Path) -> None:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    model_dir = smoke_run.parent / "assets" / "tiny-sd"
    unmerged = load_adapter(pipeline(model_dir), smoke_run)
    merged = load_adapter(pipeline(model_dir), smoke_run, merge=True)
    assert isinstance(unmerged.unet, PeftModel)
    assert type(merged.unet) is UNet2DConditionModel
    a, saved = sample_like_validation(unmerged, smoke_run)
    b, _ = sample_like_validation(merged, smoke_run)
    torch.testing.assert_close(a, saved, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, a, atol=1e-3, rtol=0)


def test_infer_script_reproduces_validation(smoke_run: Path, tmp_path: Path) -> None:
    import dreambooth_infer

    saved = torch.load(smoke_run / dreambooth.VALIDATION_DIR / dreambooth.FINAL_IMAGES)
    out = dreambooth_infer.main(["--adapter_dir", str(smoke_run), "--prompts", json.dumps(saved["prompts"]),
                                 "--num_images_per_prompt", "2", "--output_dir", str(tmp_path / "samples"),
                                 "--merge"])
    images = torch.load(out / "images.pt")["images"]
    torch.testing.assert_close(images, saved["images"], atol=1e-3, rtol=0)
    rows = dreambooth_common.read_manifest(out)
    assert [r["prompt"] for r in rows] == [p for p in saved["prompts"] for _ in range(2)]
    assert all((out / r["file"]).is_file() for r in rows) and (out / "grid.png").is_file()


def test_infer_defaults_come_from_the_run(smoke_run: Path) -> None:
    import dreambooth_infer

    args = dreambooth_infer.resolve(dreambooth_infer.InferArgs(adapter_dir=str(smoke_run), prompt_set="object",
                                                               class_noun="disc"))
    cfg = json.loads((smoke_run / "run_config.json").read_text())
    assert args.pretrained_model_name_or_path == cfg["pretrained_model_name_or_path"]
    assert (args.resolution, args.num_inference_steps, args.seed) == (32, cfg["validation_inference_steps"], 0)
    assert len(args.prompts) == 25 and args.prompts[0] == "a sks disc in the jungle"
    assert args.output_dir == str(smoke_run / "samples")
    with pytest.raises(ValueError, match="--class_noun"):
        dreambooth_infer.resolve(dreambooth_infer.InferArgs(adapter_dir=str(smoke_run), prompt_set="live"))


def test_adapter_dirs_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        adapter_dirs(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Prior preservation, text encoder, v-prediction, resume
# ----------------------------------------------------------------------------------------------------------------------
def test_prior_preservation_text_encoder_v_prediction(assets: dict[str, Path], tmp_path: Path) -> None:
    """Class images are generated for the missing ones; the prior loss is logged; a text-encoder adapter and conv
    targets train; the saved unet + text_encoder adapters load with the helper and reproduce the validation images."""
    model = dreambooth_tiny.build_tiny_sd(tmp_path / "tiny-sd-v", prediction_type="v_prediction")
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    shutil.copy(next(assets["instance"].iterdir()), class_dir / "user_image.png")  # one image the user already had
    out = tmp_path / "run"
    results = dreambooth.main([
        "--config", str(SMOKE), "--pretrained_model_name_or_path", str(model), "--smoke_assets", "false",
        "--instance_data_dir",
        str(assets["instance"]), "--output_dir", str(out), *FAST, "--max_train_steps", "3",
        "--with_prior_preservation", "--class_prompt", "a photo of a disc", "--class_data_dir", str(class_dir),
        "--num_class_images", "3", "--class_inference_steps", "2", "--sample_batch_size", "2",
        "--train_text_encoder", "--method", "double_gsoft", "--logging_steps", "1",
        "--unet_target_modules", "to_q,to_k,to_v,to_out.0,conv1,conv2",
    ])
    assert sorted(p.name for p in class_dir.iterdir()) == ["class_00001.png", "class_00002.png", "user_image.png"]
    assert results["class_images"] == 3 and results["train_text_encoder"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("prior_loss" in r for r in logged)
    assert set(adapter_dirs(out)) == {"unet", "text_encoder"}
    unet_cfg = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert unet_cfg["double"] and {"conv1", "conv2"} <= set(unet_cfg["target_modules"])
    pipe = load_adapter(pipeline(model), out)
    images, saved = sample_like_validation(pipe, out)
    torch.testing.assert_close(images, saved, atol=1e-5, rtol=0)


def test_two_processes_with_prior_preservation(assets: dict[str, Path], tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine is one gloo job (not two runs into one
    directory): class images are generated once, split over the ranks, and the run reports world_size 2."""
    out, class_dir = tmp_path / "run", tmp_path / "class"
    results = launch2(assets, out, "--with_prior_preservation", "--class_prompt", "a photo of a disc",
                      "--class_data_dir", str(class_dir), "--num_class_images", "3", "--class_inference_steps", "2",
                      "--sample_batch_size", "1")
    assert results["world_size"] == 2 and results["finished"] and results["class_images"] == 3
    # the default --grad_compression none: fp32 all-reduces, counted, and replicas equal
    assert results["compression"]["method"] == "none"
    assert results["comm_bytes_sent"] == results["comm_bytes_uncompressed"] == 6 * 4 * results["trainable_params"]
    assert len(results["rank_state_sha256"]) == 2 and len(set(results["rank_state_sha256"])) == 1
    assert len(list(class_dir.glob("*.png"))) == 3
    pipe = pipeline(assets["model"])
    load_adapter(pipe, out)


def _trained_sizes(out: Path, results: dict) -> dict[str, list[int]]:
    """Sizes of every trained tensor per model, read back from the saved adapters (checked to be all of them)."""
    from safetensors import safe_open

    sizes = {}
    for name in ("unet", "text_encoder"):
        with safe_open(str(out / name / "adapter_model.safetensors"), framework="pt") as f:
            sizes[name] = [f.get_slice(k).get_shape() for k in f.keys()]
    sizes = {name: [math.prod(shape) for shape in shapes] for name, shapes in sizes.items()}
    assert sum(map(sum, sizes.values())) == results["trainable_params"]
    return sizes


def _topk_bytes(sizes: list[int], ratio: float = 0.01) -> int:
    """Bytes one process sends for one Top-K round of these tensors on 2 processes: per tensor ceil(ratio * n) fp32
    values + int32 indices, all-gathered ((p - 1) x payload = the payload)."""
    return sum(8 * max(1, math.ceil(ratio * n)) for n in sizes)


def test_two_processes_topk_unet_and_text_encoder(assets: dict[str, Path], tmp_path: Path) -> None:
    """Top-K 1% compressed gradients on both trained DDP models (UNet and text encoder, one optimizer): the bytes are
    the per-tensor payload formula, counted once per model and step, and the replicas stay bit-identical."""
    out = tmp_path / "run"
    results = launch2(assets, out, "--grad_compression", "topk", "--compression_ratio", "0.01", "--compress", "gradients",
                      "--train_text_encoder")
    assert results["world_size"] == 2 and results["finished"]
    hashes = results["rank_state_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    sizes = _trained_sizes(out, results)
    per_model = results["compression"]
    assert set(per_model) == {"unet", "text_encoder"}
    for name, summary in per_model.items():
        assert summary["method"] == "topk" and summary["compress"] == "gradients" and summary["error_feedback"] == "ef"
        assert summary["steps"] == summary["syncs"] == 6
        assert summary["bytes_sent"] == 6 * _topk_bytes(sizes[name]), name
        assert summary["bytes_uncompressed"] == 6 * 4 * sum(sizes[name]), name
    assert results["comm_bytes_sent"] == 6 * _topk_bytes(sizes["unet"] + sizes["text_encoder"])
    assert results["comm_bytes_uncompressed"] == 6 * 4 * results["trainable_params"]
    assert results["comm_bytes_uncompressed"] > 10 * results["comm_bytes_sent"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["comm_bytes_sent"] == results["comm_bytes_sent"]


def test_two_processes_local_steps_resume(assets: dict[str, Path], tmp_path: Path) -> None:
    """Top-K 1% compressed updates every 2 local steps on UNet and text encoder: each model's state adds its own
    step post-hook to the shared optimizer. Stopped at step 3 (between two averages) and resumed: the checkpoint
    carries both states, the byte counters continue, every model is averaged at steps 2, 4 and 6 and the replicas end
    bit-identical."""
    out = tmp_path / "run"
    common = ["--grad_compression", "topk", "--local_steps", "2", "--train_text_encoder"]
    assert launch2(assets, out, *common, "--stop_after_steps", "3") == {}
    results = launch2(assets, out, *common, "--resume_from_checkpoint", "latest")
    assert results["world_size"] == 2 and results["finished"] and results["train_steps"] == 6
    hashes = results["rank_state_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    sizes = _trained_sizes(out, results)
    for name, summary in results["compression"].items():
        assert summary["compress"] == "updates" and summary["error_feedback"] == "ef"
        assert summary["steps"] == 6 and summary["syncs"] == 3, (name, summary)
        assert summary["bytes_sent"] == 3 * _topk_bytes(sizes[name]), name
    assert results["comm_bytes_sent"] == 3 * _topk_bytes(sizes["unet"] + sizes["text_encoder"])


def test_resume_matches_uninterrupted(assets: dict[str, Path], tmp_path: Path, capsys) -> None:
    # batch 1 x accumulation 2 over 4 images: 2 optimizer steps per epoch, so stopping after step 1 resumes mid-epoch
    common = [*FAST, "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_train_steps", "3"]
    full = run(assets, tmp_path / "full", *common)
    assert full["finished"]
    part = run(assets, tmp_path / "part", *common, "--stop_after_steps", "1")
    assert part is None and not (tmp_path / "part" / "results.json").exists()
    resumed = run(assets, tmp_path / "part", *common, "--resume_from_checkpoint", "latest")
    assert resumed["finished"] and resumed["train_steps"] == 3
    summary = capsys.readouterr().out.strip().splitlines()[-1]  # the end-of-run line: steps, loss, where things are
    part = tmp_path / "part"
    assert summary == (f"dreambooth (gsoft, 3 steps): final loss {resumed['final_loss']:.4f}; adapters in "
                       f"{part / 'unet'}; validation grid {part / 'validation' / 'final_step_000003.png'}; results in "
                       f"{part / 'results.json'}")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "unet" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "unet" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "skew" in k or "gsoft" in k)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------
def test_communication_option_errors(assets: dict[str, Path], tmp_path: Path) -> None:
    """Bad communication options stop before anything is loaded or written, naming the value and the fix."""
    for extra, message in [
        (["--grad_compression", "zip"],
         r"--grad_compression zip: unknown compression method 'zip'; choose one of none, fp16, bf16, int8, sign, topk"),
        (["--compression_ratio", "0"], r"--compression_ratio 0.0: compression_ratio must be in \(0, 1\].*got 0"),
        (["--compress", "gradients", "--local_steps", "2"],
         r"--compress gradients --local_steps 2: local_steps=2 averages parameter updates, not gradients"),
        (["--grad_compression", "gdsec", "--error_feedback", "ef"], r"gdsec keeps its own per-worker reference"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run(assets, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


def test_communication_ignored_in_one_process(assets: dict[str, Path], tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING"):
        results = run(assets, tmp_path / "out", *FAST, "--max_train_steps", "1", "--grad_compression", "topk")
    assert "a single process has nothing to communicate" in caplog.text
    assert results["compression"] == {"method": "none", "world_size": 1} and results["comm_bytes_sent"] == 0
    assert len(results["rank_state_sha256"]) == 1


def test_empty_instance_dir(assets: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert re.search("--instance_data_dir .*empty.* is empty", error(assets, tmp_path / "out", instance=empty))


def test_unreadable_instance_image_is_named(assets: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "instance"
    shutil.copytree(assets["instance"], bad)
    (bad / "broken.png").write_text("not an image")
    assert re.search("Cannot read image .*broken.png", error(assets, tmp_path / "out", instance=bad))


def test_prompt_without_identifier(assets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not contain the identifier 'sks'"):
        run(assets, tmp_path / "out", "--instance_prompt", "a photo of a disc")


def test_target_modules_match_nothing(assets: dict[str, Path], tmp_path: Path) -> None:
    # checked before the output directory is claimed (error() checks it is absent): a fixed re-run works
    assert re.search(r"match no Linear/Conv2d layer of the UNet.*to_q",
                     error(assets, tmp_path / "out", "--unet_target_modules", "query,value"))


def test_adapter_errors_come_before_the_output_dir(assets: dict[str, Path], tmp_path: Path) -> None:
    """A block size that divides no layer, or a text-encoder target that matches nothing, fails before any file is
    written (so the corrected run can use the same --output_dir)."""
    assert "block_size" in error(assets, tmp_path / "out", "--method_options.gsoft.block_size", "5")
    assert re.search("match no Linear/Conv2d layer of the text encoder.*q_proj",
                     error(assets, tmp_path / "out", "--train_text_encoder", "--text_encoder_target_modules", "to_q"))


def test_model_that_cannot_be_fetched_is_one_line_after_one_fetch(assets: dict[str, Path], tmp_path: Path,
                                                                   hub_downloads: list[str]) -> None:
    """A hub id that cannot be fetched (offline here; without a network the hub retries each fetch with messages):
    one config is asked for, not one per component, and the error is one line naming the option."""
    message = error(assets, tmp_path / "out", "--pretrained_model_name_or_path", "no-such-org/no-such-model")
    assert message.startswith("dreambooth: error: --pretrained_model_name_or_path 'no-such-org/no-such-model': ")
    assert hub_downloads == ["config.json"]


def test_resolution_not_divisible_by_vae_factor(assets: dict[str, Path], tmp_path: Path) -> None:
    assert "not divisible by the VAE's down-sampling factor 2" in error(assets, tmp_path / "out", "--resolution", "33")


def test_identifier_matching() -> None:
    assert dreambooth_common.has_identifier("a photo of sks dog", "sks")
    assert not dreambooth_common.has_identifier("a photo of a dog that asks", "sks")
    assert dreambooth_common.strip_identifier("a sks dog in the snow", "sks") == "a dog in the snow"
    prompts = dreambooth_common.dreambooth_prompts("sks", "dog", "live")
    assert len(prompts) == 25 and len(set(prompts)) == 25 and prompts[0] == "a sks dog in the jungle"


# ----------------------------------------------------------------------------------------------------------------------
# eval_subject.py and the benchmark
# ----------------------------------------------------------------------------------------------------------------------
def test_eval_subject_tiny_models(assets: dict[str, Path], tmp_path: Path) -> None:
    import eval_subject

    clip = dreambooth_tiny.build_tiny_clip(tmp_path / "clip")
    dino = dreambooth_tiny.build_tiny_dino(tmp_path / "dino")
    # "Generated" images identical to the single instance image: CLIP-I and DINO are exactly 1.
    instance = tmp_path / "one"
    instance.mkdir()
    first = sorted(assets["instance"].iterdir())[0]
    shutil.copy(first, instance / first.name)
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(2):
        shutil.copy(first, samples / f"{i:04d}.png")
    dreambooth_common.write_manifest(samples, [
        {"file": "0000.png", "prompt": "a sks disc in the snow", "index": 0, "seed": 0},
        {"file": "0001.png", "prompt": "a red sks disc", "index": 1, "seed": 1},
    ])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from common.run import RESULTS_SCHEMA

    (run_dir / "results.json").write_text(json.dumps({k: 0 for k in RESULTS_SCHEMA}))
    scores = eval_subject.main(["--images_dir", str(samples), "--instance_data_dir", str(instance), "--clip_model",
                                str(clip), "--dino_model", str(dino), "--results_json", str(run_dir / "results.json")])
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5) and scores["dino"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scores["clip_t"] <= 1.0
    assert [r["prompt"] for r in scores["per_prompt"]] == ["a red sks disc", "a sks disc in the snow"]
    saved = json.loads((samples / "eval.json").read_text())
    assert saved["clip_t"] == pytest.approx(scores["clip_t"])
    merged = json.loads((run_dir / "results.json").read_text())
    assert merged["eval_clip_i"] == pytest.approx(1.0, abs=1e-5) and "eval_dino" in merged
