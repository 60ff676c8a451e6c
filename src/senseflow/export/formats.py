"""The three export formats. Each writer fills the staging folder and returns the lines of stock code
that load what it wrote, plus notes for the model card.

* ``diffusers``: the whole pipeline folder (:mod:`senseflow.export.pipeline_folder`).
* ``lora``: the generator's LoRA (or one extracted by SVD from a full fine-tune) in the diffusers
  layout ``load_lora_weights`` reads on the teacher's pipeline, the family's ComfyUI layout beside
  it, and the scheduler to set.
* ``single-file``: the student in the original (non-diffusers) key layout ComfyUI and
  ``from_single_file`` read: SDXL's whole checkpoint, the FLUX / SD 3.5 transformer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from senseflow.config.schema import LORA_TARGET_MODULES
from senseflow.export.network import extract_lora, lora_factors, peft_state_dict, student_network
from senseflow.export.pipeline_folder import write_pipeline_folder, write_senseflow_files
from senseflow.export.schedulers import StockSampler
from senseflow.families.diffusers_folder import DiffusersAdapter
from senseflow.models.build import TeacherWeights
from senseflow.models.lora import LoraRole
from senseflow.student import Student

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights` looks for
COMFY_LORA_FILE = "comfyui_lora.safetensors"
TORCH_DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


@dataclass
class ExportJob:
    student: Student
    adapter: DiffusersAdapter
    sampler: StockSampler
    folder: Path  # where to write (the staging folder)
    out: str  # where the folder will be, as the user named it (for the code in the card)
    dtype: torch.dtype
    dtype_name: str
    summary: dict[str, Any]  # the inference settings, also stored as safetensors metadata
    rank: int | None = None
    target_modules: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def torch_dtype(self) -> str:
        return TORCH_DTYPES[self.dtype_name]

    def metadata(self) -> dict[str, str]:
        """safetensors metadata (strings only): the settings a loader needs."""
        return {"senseflow.export": json.dumps(self.summary), "format": "pt"}

    def teacher_args(self) -> str:
        """The teacher as the recipe pins it (revision and weight variant), as Python arguments."""
        model = self.student.cfg.model
        args = f'"{model.teacher}"'
        if model.revision:
            args += f', revision="{model.revision}"'
        if model.variant:
            args += f', variant="{model.variant}"'
        return args

    def scheduler_lines(self) -> str:
        cls = self.sampler.class_name
        return f'pipe.scheduler = {cls}.from_pretrained("{self.out}", subfolder="scheduler")\n'


def noise_note(sampler: StockSampler) -> list[str]:
    if sampler.class_name == "FlowMatchEulerDiscreteScheduler" and sampler.config.get("stochastic_sampling"):
        return [
            "The stock flow pipelines do not pass `generator` to the scheduler: the fresh noise of each "
            "renoising step comes from torch's global generator, so call `torch.manual_seed(seed)` "
            "too for repeatable images."
        ]
    return []


def write_diffusers(job: ExportJob) -> str:
    adapter = job.adapter
    network = adapter.export_network(student_network(job.student.generator))
    write_pipeline_folder(adapter, network, job.sampler, job.folder, job.dtype)
    write_senseflow_files(
        job.folder, job.student.cfg, adapter.anchors, {**job.summary, "network": adapter.NETWORK}
    )
    job.notes.append("`senseflow generate --run DIR` also loads this folder (its recipe is in `senseflow/`).")
    return (
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{job.out}", torch_dtype={job.torch_dtype}).to("cuda")'
    )


def _extracted_factors(job: ExportJob):
    if job.rank is None:
        raise ValueError(
            "--format lora on a fully fine-tuned run extracts a LoRA by SVD: give its --rank (e.g. --rank 64)"
        )
    network = student_network(job.student.generator)
    teacher = TeacherWeights(job.adapter.weight_files())
    ex = extract_lora(network, teacher, job.rank, job.target_modules or LORA_TARGET_MODULES)
    job.summary["lora_source"] = {
        "extracted_rank": ex.rank,
        "relative_error": ex.relative_error,
        "outside_share": ex.outside_share,
    }
    message = (
        f"extracted rank {ex.rank} by SVD: relative error {ex.relative_error:.3e} over the LoRA's "
        f"{len(ex.factors)} layers; {ex.outside_share:.3e} of the change lies in "
        f"{len(ex.outside_tensors)} other tensors, which a LoRA does not carry"
    )
    print(message)
    job.notes.append(message[0].upper() + message[1:] + ".")
    if getattr(job.adapter, "teacher_has_guidance", False):
        job.notes.append(
            "The student was trained without the teacher's guidance embedding, which stays active on "
            "the teacher's pipeline (its guidance_scale): this LoRA only approximates the student there; "
            "the diffusers and single-file exports hold the student exactly."
        )
    if ex.unmatched:
        job.notes.append(f"Student tensors the teacher lacks (not carried): {', '.join(ex.unmatched)}.")
    return ex.factors


def write_lora(job: ExportJob) -> str:
    adapter, generator = job.adapter, job.student.generator
    if isinstance(generator, LoraRole):
        if job.rank is not None or job.target_modules:
            raise ValueError(
                "--rank / --target-modules extract a LoRA from a full fine-tune; this LoRA-mode run "
                f"exports its own adapter (rank {job.student.cfg.model.lora.rank}): drop them"
            )
        factors = lora_factors(generator)
        job.summary["lora_source"] = "adapter"
    else:
        factors = _extracted_factors(job)
    state = peft_state_dict(factors, job.dtype)
    prefixed = {f"{adapter.NETWORK}.{k}": v for k, v in state.items()}
    save_file(prefixed, str(job.folder / LORA_FILE), metadata=job.metadata())
    if type(adapter).kohya_lora_state_dict is not DiffusersAdapter.kohya_lora_state_dict:
        save_file(
            adapter.kohya_lora_state_dict(state), str(job.folder / COMFY_LORA_FILE), metadata=job.metadata()
        )
        job.notes.append(f"`{COMFY_LORA_FILE}`: the same LoRA in the kohya layout ComfyUI loads.")
    else:
        job.notes.append(f"ComfyUI loads `{LORA_FILE}` (the diffusers layout) as it is.")
    job.sampler.scheduler().save_pretrained(job.folder / "scheduler")
    return (
        f"from diffusers import DiffusionPipeline, {job.sampler.class_name}\n\n"
        f"pipe = DiffusionPipeline.from_pretrained({job.teacher_args()}, torch_dtype={job.torch_dtype})\n"
        + job.scheduler_lines()
        + f'pipe.load_lora_weights("{job.out}")\npipe.to("cuda")'
    )


def write_single_file(job: ExportJob) -> str:
    adapter = job.adapter
    network = adapter.export_network(student_network(job.student.generator))
    states = {adapter.NETWORK: {k: v.to(job.dtype) for k, v in network.state_dict().items()}}
    for component in adapter.SINGLE_FILE_COMPONENTS:
        if component != adapter.NETWORK and adapter.folder.has(component):
            module = adapter.folder.load(component)
            states[component] = {k: v.to(job.dtype) for k, v in module.state_dict().items()}
    tensors = adapter.single_file_state_dict(states)
    name = f"{job.student.cfg.name}.safetensors"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(job.folder / name), metadata=job.metadata()
    )
    job.sampler.scheduler().save_pretrained(job.folder / "scheduler")
    pipeline = adapter.folder.index.get("_class_name", adapter.PIPELINE)
    sampler_cls, path = job.sampler.class_name, f"{job.out}/{name}"
    job.notes.append(
        f"`{name}` holds {', '.join(states)} in the original (non-diffusers) key layout; ComfyUI loads "
        "it as a checkpoint; use the steps and anchors above."
    )
    if set(states) != {adapter.NETWORK}:  # the whole pipeline is in the file
        code = (
            f"from diffusers import {pipeline}, {sampler_cls}\n\n"
            f'pipe = {pipeline}.from_single_file("{path}", config="{job.student.cfg.model.teacher}", '
            f"torch_dtype={job.torch_dtype})\n"
        )
    else:  # the network only: the rest comes from the teacher; its config is the student's own
        network.save_config(job.folder / adapter.NETWORK)  # FLUX: without the guidance input
        cls = type(network).__name__
        code = (
            f"from diffusers import {pipeline}, {cls}, {sampler_cls}\n\n"
            f'net = {cls}.from_single_file("{path}", config="{job.out}", subfolder="{adapter.NETWORK}", '
            f"torch_dtype={job.torch_dtype})\n"
            f"pipe = {pipeline}.from_pretrained({job.teacher_args()}, {adapter.NETWORK}=net, "
            f"torch_dtype={job.torch_dtype})\n"
        )
    return code + job.scheduler_lines() + 'pipe.to("cuda")'


WRITERS = {"diffusers": write_diffusers, "lora": write_lora, "single-file": write_single_file}
