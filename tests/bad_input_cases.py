"""The table of bad command lines that tests/test_bad_inputs.py runs: a new command or field joins by
adding a row. Placeholders in a row: ``{tmp}`` (the scratch folder, also the working directory),
``{run}`` (a finished 1-iteration toy run), ``{broken_run}`` (that run with a truncated checkpoint),
``{teacher}`` (a tiny toy teacher folder)."""

from __future__ import annotations

from typing import NamedTuple

from senseflow.errors import RUNTIME, USAGE


class Case(NamedTuple):
    """One bad command line: what it must answer, and which folder must stay as it was."""

    id: str
    argv: str  # shell words, with the placeholders of the module docstring
    names: str | tuple[str, ...]  # what the error line must contain (all of them)
    code: int = USAGE
    outputs: str | None = None  # a folder the command writes to; it must not gain files


def case(id: str, argv: str, names: str | tuple[str, ...], code: int = USAGE, outputs: str | None = None):
    return Case(id, argv, names, code, outputs)


# The teacher folder is never read: every teacher-sample row fails before the teacher loads.
TS = (
    "teacher-sample --teacher {tmp}/a_folder --family sdxl --prompts {tmp}/prompts.txt "
    "--out {tmp}/ts/s.safetensors"
)
GEN = "generate --run {run} --prompt 'a small red circle' --out {tmp}/images"
EVAL = "eval run {tmp}/eval.yaml"
LINES = "prompts.kind=lines"
FOLDER_REF = "students=[] 'reference={{name: ref, kind: folder, path: {tmp}/%s}}' prompts.kind=lines"
COCO = "eval build-prompts coco5k --out {tmp}/prompt_sets"
CT = "cache-text toy/distill --out {tmp}/text_cache --skip-dataset"
CL = "cache-latents toy/distill --out {tmp}/latents"
CL_JSON = "cache-latents sd35_large data.kind=json data.crop=center --out {tmp}/latents"
EXPORT = "export {run} --out {tmp}/export"

CASES = [
    # the command line itself
    case("cli-no-command", "", "command"),
    case("cli-unknown-command", "frobnicate", "frobnicate"),
    # train: the recipe
    case("train-no-recipe", "train", "recipe"),
    case("train-unknown-option", "train toy/distill --frobnicate", "--frobnicate"),
    case("train-recipe-missing", "train {tmp}/nope.yaml", "nope.yaml"),
    case("train-recipe-unknown-name", "train toy/distil", "toy/distil"),
    case("train-recipe-is-a-folder", "train {tmp}/a_folder", "a_folder"),
    case("train-recipe-empty", "train {tmp}/empty.yaml", "empty.yaml"),
    case("train-recipe-binary", "train {tmp}/binary.yaml", "binary.yaml"),
    case("train-recipe-not-a-mapping", "train {tmp}/list.yaml", "list.yaml"),
    case("train-recipe-bad-yaml", "train {tmp}/broken.yaml", "broken.yaml"),
    case("train-recipe-duplicate-key", "train {tmp}/duplicate.yaml", "seed"),
    case("train-override-without-value", "train toy/distill optim.generator.lr", "optim.generator.lr"),
    case("train-unknown-key", "train toy/distill optim.generator.lrr=1e-4", "optim.generator.lrr"),
    case("train-unknown-section", "train toy/distill optimm.generator.lr=1e-4", "optimm"),
    case("train-lr-inf", "train toy/distill optim.generator.lr=.inf", "optim.generator.lr"),
    case("train-lr-nan", "train toy/distill optim.generator.lr=.nan", "optim.generator.lr"),
    case("train-lr-negative", "train toy/distill optim.generator.lr=-1", "optim.generator.lr"),
    case("train-lr-not-a-number", "train toy/distill optim.generator.lr=fast", "optim.generator.lr"),
    case("train-iterations-zero", "train toy/distill schedule.iterations=0", "schedule.iterations"),
    case("train-iterations-fraction", "train toy/distill schedule.iterations=2.5", "schedule.iterations"),
    case("train-batch-size-zero", "train toy/distill data.batch_size=0", "data.batch_size"),
    case("train-resolution-negative", "train toy/distill data.resolution=-32", "data.resolution"),
    case("train-seed-not-a-number", "train toy/distill seed=abc", "seed"),
    case("train-seed-negative", "train toy/distill seed=-1", "seed"),
    case("train-seed-huge", "train toy/distill seed=100000000000000000000000", "seed"),
    case("train-teacher-missing", "train toy/distill model.teacher={tmp}/nope", "model.teacher"),
    case("train-teacher-is-a-file", "train toy/distill model.teacher={tmp}/file.txt", "model.teacher"),
    # train: the run folder
    case("train-folder-holds-a-run", "train toy/distill output_dir={tmp}/held", "held", outputs="{tmp}/held"),
    case(
        "train-resume-without-checkpoint",
        "train toy/distill output_dir={tmp}/no_checkpoint --resume",
        "no_checkpoint",
        outputs="{tmp}/no_checkpoint",
    ),
    case(
        "train-overwrite-with-resume",
        "train toy/distill output_dir={tmp}/held --overwrite --resume",
        ("--overwrite", "--resume"),
        outputs="{tmp}/held",
    ),
    case(
        "train-resume-missing-checkpoint",
        "train toy/distill output_dir={tmp}/fresh --resume {tmp}/nope",
        "nope",
    ),
    # recipes
    case("recipes-extra-argument", "recipes toy", "toy"),
    case("recipes-unknown-option", "recipes --all", "--all"),
    # generate
    case("generate-no-run", "generate --prompt a", "--run"),
    case("generate-no-prompt", "generate --run {run} --out {tmp}/images", "--prompt"),
    case("generate-unknown-option", f"{GEN} --frobnicate", "--frobnicate"),
    case("generate-seed-not-a-number", f"{GEN} --seed abc", "--seed"),
    case("generate-seed-negative", f"{GEN} --seed -1", "--seed"),
    case("generate-seed-huge", f"{GEN} --seed 100000000000000000000000", "--seed"),
    case("generate-batch-size-zero", f"{GEN} --batch-size 0", "--batch-size"),
    case("generate-batch-size-negative", f"{GEN} --batch-size -2", "--batch-size"),
    case("generate-batch-size-fraction", f"{GEN} --batch-size 1.5", "--batch-size"),
    case("generate-decode-batch-size-zero", f"{GEN} --decode-batch-size 0", "--decode-batch-size"),
    case("generate-sampler-unknown", f"{GEN} --sampler ddim", "--sampler"),
    case("generate-dtype-unknown", f"{GEN} --dtype fp64", "--dtype"),
    case("generate-device-unknown", f"{GEN} --device tpu", "--device"),
    case("generate-prompts-missing", f"{GEN} --prompts {{tmp}}/nope.txt", "nope.txt"),
    case("generate-prompts-is-a-folder", f"{GEN} --prompts {{tmp}}/a_folder", "a_folder"),
    case("generate-prompts-empty", f"{GEN} --prompts {{tmp}}/empty.txt", "empty.txt"),
    case("generate-prompts-blank", f"{GEN} --prompts {{tmp}}/blank.txt", "blank.txt"),
    case("generate-prompts-binary", f"{GEN} --prompts {{tmp}}/binary.txt", "binary.txt"),
    case("generate-prompts-long-line", f"{GEN} --prompts {{tmp}}/long.txt", "long.txt"),
    case("generate-prompts-bad-json", f"{GEN} --prompts {{tmp}}/numbers.json", "numbers.json"),
    case("generate-run-missing", "generate --run {tmp}/nope --prompt a --out {tmp}/images", "nope"),
    case("generate-run-is-a-file", "generate --run {tmp}/file.txt --prompt a --out {tmp}/images", "file.txt"),
    case("generate-run-not-a-run", "generate --run {tmp}/a_folder --prompt a --out {tmp}/images", "a_folder"),
    case(
        "generate-run-without-checkpoint",
        "generate --run {tmp}/no_checkpoint --prompt a --out {tmp}/images",
        "no_checkpoint",
    ),
    case("generate-checkpoint-missing", f"{GEN} --checkpoint {{tmp}}/nope", "--checkpoint"),
    case(
        "generate-out-holds-images",
        "generate --run {run} --prompt a --out {tmp}/generated",
        ("generated", "--overwrite", "--out"),
        outputs="{tmp}/generated",
    ),
    case("generate-out-is-a-file", "generate --run {run} --prompt a --out {tmp}/file.txt", "file.txt"),
    case("generate-out-under-a-file", "generate --run {run} --prompt a --out {tmp}/file.txt/x", "file.txt"),
    # eval run
    case("eval-no-subcommand", "eval", "run"),
    case("eval-run-recipe-missing", "eval run {tmp}/nope.yaml", "nope.yaml"),
    case("eval-run-recipe-is-a-folder", "eval run {tmp}/a_folder", "a_folder"),
    case("eval-run-recipe-duplicate-key", "eval run {tmp}/eval_duplicate.yaml", "output_dir"),
    case("eval-run-unknown-key", f"{EVAL} prompts.limt=3", "prompts.limt"),
    case("eval-run-unknown-option", f"{EVAL} --frobnicate", "--frobnicate"),
    case("eval-run-limit-zero", f"{EVAL} prompts.limit=0", "prompts.limit"),
    case("eval-run-seed-not-a-number", f"{EVAL} seeds.base=abc", "seeds.base"),
    case("eval-run-guidance-inf", f"{EVAL} reference.guidance=.inf", "reference.guidance"),
    case("eval-run-steps-negative", f"{EVAL} reference.steps=-4", "reference.steps"),
    case("eval-run-batch-size-nan", f"{EVAL} metrics.batch_size=.nan", "metrics.batch_size"),
    case("eval-run-device-unknown", f"{EVAL} device=tpu", "device"),
    case("eval-run-kind-unknown", f"{EVAL} reference.kind=nosuch", "nosuch"),
    case("eval-run-prompts-missing", f"{EVAL} {LINES} prompts.path={{tmp}}/nope.txt", "nope.txt"),
    case("eval-run-prompts-is-a-folder", f"{EVAL} {LINES} prompts.path={{tmp}}/a_folder", "a_folder"),
    case("eval-run-prompts-empty", f"{EVAL} {LINES} prompts.path={{tmp}}/empty.txt", "empty.txt"),
    case("eval-run-prompts-binary", f"{EVAL} {LINES} prompts.path={{tmp}}/binary.txt", "binary.txt"),
    case("eval-run-prompts-long-line", f"{EVAL} {LINES} prompts.path={{tmp}}/long.txt", "long.txt"),
    case("eval-run-tsv-binary", f"{EVAL} prompts.kind=tsv prompts.path={{tmp}}/binary.txt", "binary.txt"),
    case("eval-run-tsv-empty", f"{EVAL} prompts.kind=tsv prompts.path={{tmp}}/empty.txt", "empty.txt"),
    case(
        "eval-run-student-missing",
        f"{EVAL} 'students=[{{{{name: s, kind: student, path: {{tmp}}/nope}}}}]'",
        "nope",
    ),
    case(
        "eval-run-student-not-a-run",
        f"{EVAL} 'students=[{{{{name: s, kind: student, path: {{tmp}}/a_folder}}}}]'",
        "a_folder",
    ),
    case(
        "eval-run-image-folder-missing",
        f"{EVAL} {FOLDER_REF % 'nope'} prompts.path={{tmp}}/prompts.txt",
        "nope",
    ),
    case(
        "eval-run-image-not-an-image",
        f"{EVAL} {FOLDER_REF % 'text_images'} prompts.path={{tmp}}/prompts.txt",
        "text_images/00000.png",
    ),
    case(
        "eval-run-image-zero-bytes",
        f"{EVAL} {FOLDER_REF % 'empty_images'} prompts.path={{tmp}}/prompts.txt",
        "empty_images/00000.png",
    ),
    case(
        "eval-run-image-missing",
        f"{EVAL} {FOLDER_REF % 'a_folder'} prompts.path={{tmp}}/prompts.txt",
        "a_folder/00000.png",
    ),
    # eval weights, fetch-weights
    case("eval-weights-root-is-a-file", "eval weights --root {tmp}/file.txt", "file.txt"),
    case("eval-weights-unknown-option", "eval weights --frobnicate", "--frobnicate"),
    case("eval-fetch-no-names", "eval fetch-weights --root {tmp}/weights", "names"),
    case("eval-fetch-no-root", "eval fetch-weights fid.inception", "--root"),
    case("eval-fetch-unknown-name", "eval fetch-weights nosuch --root {tmp}/weights", "nosuch"),
    case("eval-fetch-root-is-a-file", "eval fetch-weights fid.inception --root {tmp}/file.txt", "file.txt"),
    # eval build-prompts
    case("prompts-unknown-set", "eval build-prompts coco --out {tmp}/prompt_sets", "coco"),
    case("prompts-no-out", "eval build-prompts coco5k --captions {tmp}/coco.json", "--out"),
    case("prompts-unknown-option", f"{COCO} --frobnicate", "--frobnicate"),
    case("prompts-coco-no-captions", f"{COCO} --rule first", "--captions"),
    case("prompts-coco-rule-unknown", f"{COCO} --rule longest --captions {{tmp}}/coco.json", "--rule"),
    case("prompts-coco-captions-missing", f"{COCO} --rule first --captions {{tmp}}/nope.json", "nope.json"),
    case("prompts-coco-captions-is-a-folder", f"{COCO} --rule first --captions {{tmp}}/a_folder", "a_folder"),
    case("prompts-coco-captions-empty", f"{COCO} --rule first --captions {{tmp}}/empty.txt", "empty.txt"),
    case("prompts-coco-captions-binary", f"{COCO} --rule first --captions {{tmp}}/binary.txt", "binary.txt"),
    case(
        "prompts-coco-captions-not-coco",
        f"{COCO} --rule first --captions {{tmp}}/numbers.json",
        "numbers.json",
    ),
    case("prompts-coco-too-few-images", f"{COCO} --rule first --captions {{tmp}}/coco.json", "coco.json"),
    case("prompts-coco-max-clip-without-clip", f"{COCO} --captions {{tmp}}/coco.json", "--clip"),
    case(
        "prompts-coco-clip-missing",
        f"{COCO} --captions {{tmp}}/coco.json --clip {{tmp}}/nope --images {{tmp}}/a_folder --clip-name c",
        "--clip",
    ),
    case(
        "prompts-coco-images-missing",
        f"{COCO} --captions {{tmp}}/coco.json --clip {{tmp}}/a_folder --images {{tmp}}/nope --clip-name c",
        "--images",
    ),
    case(
        "prompts-coco-out-is-a-file",
        "eval build-prompts coco5k --out {tmp}/file.txt --rule first --any-count --captions {tmp}/coco.json",
        "file.txt",
    ),
    case("prompts-compbench-no-dataset", "eval build-prompts compbench --out {tmp}/prompt_sets", "--dataset"),
    case(
        "prompts-compbench-dataset-missing",
        "eval build-prompts compbench --out {tmp}/prompt_sets --dataset {tmp}/nope",
        "nope",
    ),
    case(
        "prompts-compbench-dataset-is-a-file",
        "eval build-prompts compbench --out {tmp}/prompt_sets --dataset {tmp}/file.txt",
        "file.txt",
    ),
    case(
        "prompts-compbench-binary-file",
        "eval build-prompts compbench --out {tmp}/prompt_sets --dataset {tmp}/compbench_binary",
        "color_val.txt",
    ),
    case(
        "prompts-compbench-empty-file",
        "eval build-prompts compbench --out {tmp}/prompt_sets --dataset {tmp}/compbench_empty",
        "color_val.txt",
    ),
    # demo
    case("demo-unknown-option", "demo --frobnicate", "--frobnicate"),
    case("demo-seed-not-a-number", "demo --seed abc", "--seed", outputs="{tmp}/runs"),
    case("demo-seed-negative", "demo --seed -1", "--seed", outputs="{tmp}/runs"),
    case("demo-per-split-zero", "demo --per-split 0", "--per-split", outputs="{tmp}/runs"),
    case("demo-per-split-negative", "demo --per-split -3", "--per-split", outputs="{tmp}/runs"),
    case("demo-paired-per-split-negative", "demo --paired-per-split -1", "--paired-per-split"),
    case("demo-diversity-seeds-one", "demo --diversity-seeds 1", "--diversity-seeds", outputs="{tmp}/runs"),
    case("demo-recipe-missing", "demo --recipe {tmp}/nope.yaml", "nope.yaml", outputs="{tmp}/runs"),
    case("demo-lr-nan", "demo optim.generator.lr=.nan", "optim.generator.lr", outputs="{tmp}/runs"),
    case("demo-unknown-key", "demo schedule.iteratons=3", "schedule.iteratons", outputs="{tmp}/runs"),
    case("demo-out-is-a-file", "demo --out {tmp}/file.txt", "file.txt"),
    # toy train-teacher, sample, report-teacher, ablate
    case("toy-no-subcommand", "toy", "train-teacher"),
    case(
        "toy-teacher-config-missing", "toy train-teacher --config {tmp}/nope.yaml --out {tmp}/t", "nope.yaml"
    ),
    case("toy-teacher-unknown-key", "toy train-teacher --out {tmp}/t train.stepz=1", "train.stepz"),
    case("toy-teacher-steps-negative", "toy train-teacher --out {tmp}/t train.steps=-1", "train.steps"),
    case("toy-teacher-lr-nan", "toy train-teacher --out {tmp}/t train.lr=.nan", "train.lr"),
    case(
        "toy-teacher-duplicate-key",
        "toy train-teacher --config {tmp}/teacher_duplicate.yaml --out {tmp}/t",
        "seed",
    ),
    case("toy-teacher-out-is-a-file", "toy train-teacher --out {tmp}/file.txt", "file.txt"),
    case("toy-sample-n-zero", "toy sample --teacher {teacher} --n 0", "--n"),
    case("toy-sample-n-negative", "toy sample --teacher {teacher} --n -5", "--n"),
    case("toy-sample-steps-zero", "toy sample --teacher {teacher} --steps 0", "--steps"),
    case("toy-sample-guidance-nan", "toy sample --teacher {teacher} --guidance nan", "--guidance"),
    case("toy-sample-cols-zero", "toy sample --teacher {teacher} --cols 0", "--cols"),
    case("toy-sample-seed-negative", "toy sample --teacher {teacher} --seed -1", "--seed"),
    case("toy-sample-seed-huge", "toy sample --teacher {teacher} --seed 9223372036854775800", "--seed"),
    case("toy-sample-unknown-option", "toy sample --teacher {teacher} --frobnicate", "--frobnicate"),
    case("toy-sample-split-unknown", "toy sample --teacher {teacher} --split nosuch", "--split"),
    case("toy-sample-teacher-missing", "toy sample --teacher {tmp}/nope", "nope"),
    case("toy-sample-teacher-not-a-teacher", "toy sample --teacher {tmp}/a_folder", "a_folder"),
    case("toy-sample-prompts-missing", "toy sample --teacher {teacher} --prompts {tmp}/nope.txt", "nope.txt"),
    case("toy-sample-prompts-empty", "toy sample --teacher {teacher} --prompts {tmp}/empty.txt", "empty.txt"),
    case(
        "toy-sample-prompts-binary", "toy sample --teacher {teacher} --prompts {tmp}/binary.txt", "binary.txt"
    ),
    case(
        "toy-sample-prompts-long-line", "toy sample --teacher {teacher} --prompts {tmp}/long.txt", "long.txt"
    ),
    case("toy-sample-out-is-a-folder", "toy sample --teacher {teacher} --out {tmp}/a_folder", "a_folder"),
    case("toy-report-per-split-zero", "toy report-teacher --teacher {teacher} --per-split 0", "--per-split"),
    case("toy-report-steps-zero", "toy report-teacher --teacher {teacher} --steps 4 0", "--steps"),
    case("toy-report-guidance-inf", "toy report-teacher --teacher {teacher} --guidance inf", "--guidance"),
    case("toy-report-teacher-missing", "toy report-teacher --teacher {tmp}/nope", "nope"),
    case(
        "toy-report-out-is-a-folder",
        "toy report-teacher --teacher {teacher} --out {tmp}/a_folder",
        "a_folder",
    ),
    case("toy-ablate-variant-unknown", "toy ablate --variants nosuch", "--variants"),
    case("toy-ablate-seeds-not-numbers", "toy ablate --seeds abc", "--seeds"),
    case("toy-ablate-curve-every-zero", "toy ablate --curve-every 0", "--curve-every"),
    case("toy-ablate-jobs-zero", "toy ablate --jobs 0", "--jobs"),
    case("toy-ablate-name-with-folder", "toy ablate --name ../report", "--name"),
    case("toy-ablate-seeds-repeated", "toy ablate --seeds 0 1 0", "--seeds"),
    case("toy-ablate-seed-negative", "toy ablate --seeds -1", "--seeds"),
    case("toy-ablate-variants-repeated", "toy ablate --variants vanilla full vanilla", "--variants"),
    case("toy-ablate-prompt-seed-negative", "toy ablate --prompt-seed -1", "--prompt-seed"),
    case("toy-ablate-iterations-zero", "toy ablate --iterations 0", "--iterations"),
    case("toy-ablate-batch-size-zero", "toy ablate --batch-size 0", "--batch-size"),
    case("toy-ablate-per-split-zero", "toy ablate --per-split 0", "--per-split"),
    case("toy-ablate-threads-zero", "toy ablate --threads 0", "--threads"),
    case("toy-ablate-name-with-extension", "toy ablate --name report.md", "--name"),
    case("toy-ablate-diversity-seeds-one", "toy ablate --diversity-seeds 1", "--diversity-seeds"),
    case("toy-curve-no-run", "toy curve --out {tmp}/c.md", "--run"),
    case("toy-curve-run-missing", "toy curve --run {tmp}/nope --out {tmp}/c.md", "nope"),
    case("toy-curve-no-checkpoints", "toy curve --run {tmp}/a_folder --out {tmp}/c.md", "checkpoint"),
    case(
        "toy-curve-per-split-zero",
        "toy curve --run {tmp}/a_folder --out {tmp}/c.md --per-split 0",
        "--per-split",
    ),
    case(
        "toy-curve-diversity-seeds-one",
        "toy curve --run {tmp}/a_folder --out {tmp}/c.md --diversity-seeds 1",
        "--diversity-seeds",
    ),
    case("toy-curve-out-is-a-folder", "toy curve --run {tmp}/a_folder --out {tmp}/a_folder", "a_folder"),
    case(
        "toy-curve-sampler-unknown",
        "toy curve --run {tmp}/a_folder --out {tmp}/c.md --sampler ddim",
        "--sampler",
    ),
    # cache-text
    case("cache-text-no-recipe", "cache-text", "recipe"),
    case("cache-text-unknown-option", f"{CT} --frobnicate", "--frobnicate"),
    case("cache-text-recipe-missing", "cache-text {tmp}/nope.yaml --out {tmp}/text_cache", "nope.yaml"),
    case("cache-text-unknown-key", f"{CT} model.text_cach=x", "model.text_cach"),
    case("cache-text-no-out", "cache-text toy/distill", "--out"),
    case(
        "cache-text-out-is-a-file", "cache-text toy/distill --out {tmp}/file.txt --skip-dataset", "file.txt"
    ),
    case("cache-text-world-zero", f"{CT} --world 0", "--world"),
    case("cache-text-batch-size-zero", f"{CT} --batch-size 0", "--batch-size"),
    case("cache-text-shard-size-negative", f"{CT} --shard-size -1", "--shard-size"),
    case("cache-text-device-unknown", f"{CT} --device tpu", "--device"),
    case("cache-text-prompts-missing", f"{CT} --prompts {{tmp}}/nope.txt", "nope.txt"),
    case("cache-text-prompts-empty", f"{CT} --prompts {{tmp}}/empty.txt", "empty.txt"),
    case("cache-text-prompts-binary", f"{CT} --prompts {{tmp}}/binary.txt", "binary.txt"),
    case("cache-text-prompts-long-line", f"{CT} --prompts {{tmp}}/long.txt", "long.txt"),
    # cache-latents
    case("cache-latents-no-recipe", "cache-latents", "recipe"),
    case("cache-latents-unknown-option", f"{CL} --frobnicate", "--frobnicate"),
    case("cache-latents-recipe-missing", "cache-latents {tmp}/nope.yaml --out {tmp}/latents", "nope.yaml"),
    case("cache-latents-lr-nan", f"{CL} optim.generator.lr=.nan", "optim.generator.lr"),
    case("cache-latents-no-out", "cache-latents toy/distill", "--out"),
    case("cache-latents-out-is-a-file", "cache-latents toy/distill --out {tmp}/file.txt", "file.txt"),
    case("cache-latents-batch-size-zero", f"{CL} --batch-size 0", "--batch-size"),
    case("cache-latents-shard-size-zero", f"{CL} --shard-size 0", "--shard-size"),
    case("cache-latents-no-images", CL, "data.kind"),
    case("cache-latents-data-missing", f"{CL_JSON} data.path={{tmp}}/nope.json", "nope.json"),
    case("cache-latents-data-is-a-folder", f"{CL_JSON} data.path={{tmp}}/a_folder", "a_folder"),
    # plan
    case("plan-no-recipe", "plan", "recipe"),
    case("plan-unknown-option", "plan toy/distill --frobnicate", "--frobnicate"),
    case("plan-recipe-missing", "plan {tmp}/nope.yaml", "nope.yaml"),
    case("plan-gpus-zero", "plan toy/distill --gpus 0", "--gpus"),
    case("plan-gpus-not-a-number", "plan toy/distill --gpus two", "--gpus"),
    case("plan-nodes-negative", "plan toy/distill --nodes -1", "--nodes"),
    case("plan-gpu-memory-zero", "plan toy/distill --gpu-memory 0", "--gpu-memory"),
    case("plan-gpu-memory-nan", "plan toy/distill --gpu-memory nan", "--gpu-memory"),
    case("plan-gpu-memory-inf", "plan toy/distill --gpu-memory inf", "--gpu-memory"),
    case("plan-batch-zero", "plan toy/distill --batch 0", "--batch"),
    case("plan-lora-rank-zero", "plan toy/distill --lora-rank 0", "--lora-rank"),
    case("plan-lr-inf", "plan toy/distill optim.generator.lr=.inf", "optim.generator.lr"),
    case("plan-unknown-key", "plan toy/distill data.batchsize=2", "data.batchsize"),
    # export
    case("export-no-run", "export --out {tmp}/export", "run"),
    case("export-no-out", "export {run}", "--out"),
    case("export-unknown-option", f"{EXPORT} --frobnicate", "--frobnicate"),
    case("export-run-missing", "export {tmp}/nope --out {tmp}/export", "nope"),
    case("export-run-is-a-file", "export {tmp}/file.txt --out {tmp}/export", "file.txt"),
    case("export-run-not-a-run", "export {tmp}/a_folder --out {tmp}/export", "a_folder"),
    case("export-step-missing", f"{EXPORT} --step 7", "--step"),
    case("export-step-negative", f"{EXPORT} --step -1", "--step"),
    case("export-format-unknown", f"{EXPORT} --format onnx", "--format"),
    case("export-dtype-unknown", f"{EXPORT} --dtype fp64", "--dtype"),
    case("export-rank-zero", f"{EXPORT} --format lora --rank 0", "--rank"),
    case("export-device-unknown", f"{EXPORT} --device tpu", "--device"),
    case("export-eval-missing", f"{EXPORT} --eval {{tmp}}/nope.json", "--eval"),
    case("export-eval-binary", f"{EXPORT} --eval {{tmp}}/binary.txt", "binary.txt"),
    case("export-eval-empty", f"{EXPORT} --eval {{tmp}}/empty.txt", "empty.txt"),
    case(
        "export-out-not-empty",
        "export {run} --out {tmp}/exported",
        ("exported", "--overwrite"),
        outputs="{tmp}/exported",
    ),
    case("export-out-is-a-file", "export {run} --out {tmp}/file.txt", "file.txt"),
    case(
        "export-checkpoint-corrupt", "export {broken_run} --out {tmp}/export", "step-00000001", code=RUNTIME
    ),
    # teacher-sample
    case(
        "teacher-sample-no-teacher",
        "teacher-sample --family sdxl --prompts {tmp}/prompts.txt --out x",
        "--teacher",
    ),
    case("teacher-sample-unknown-option", f"{TS} --frobnicate", "--frobnicate"),
    case("teacher-sample-teacher-missing", f"{TS} --teacher {{tmp}}/nope", "nope"),
    case("teacher-sample-teacher-is-a-file", f"{TS} --teacher {{tmp}}/file.txt", "file.txt"),
    case("teacher-sample-family-unknown", f"{TS} --family nosuch", "--family"),
    case("teacher-sample-prompts-missing", f"{TS} --prompts {{tmp}}/nope.txt", "nope.txt"),
    case("teacher-sample-prompts-empty", f"{TS} --prompts {{tmp}}/empty.txt", "empty.txt"),
    case("teacher-sample-prompts-binary", f"{TS} --prompts {{tmp}}/binary.txt", "binary.txt"),
    case("teacher-sample-prompts-long-line", f"{TS} --prompts {{tmp}}/long.txt", "long.txt"),
    case("teacher-sample-height-zero", f"{TS} --height 0", "--height"),
    case("teacher-sample-width-negative", f"{TS} --width -64", "--width"),
    case("teacher-sample-height-huge", f"{TS} --height 1000000", "--height"),
    case("teacher-sample-steps-zero", f"{TS} --steps 0", "--steps"),
    case("teacher-sample-guidance-nan", f"{TS} --guidance nan", "--guidance"),
    case("teacher-sample-seed-negative", f"{TS} --seed -1", "--seed"),
    case("teacher-sample-max-sequence-length-zero", f"{TS} --max-sequence-length 0", "--max-sequence-length"),
    case("teacher-sample-dtype-unknown", f"{TS} --dtype fp64", "--dtype"),
    case("teacher-sample-latents-missing", f"{TS} --latents {{tmp}}/nope.safetensors", "nope.safetensors"),
    case("teacher-sample-latents-not-safetensors", f"{TS} --latents {{tmp}}/file.txt", "file.txt"),
    case("teacher-sample-out-is-a-folder", f"{TS} --out {{tmp}}/a_folder", "a_folder"),
]
