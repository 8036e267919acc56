"""Model cards: the markdown a registered version shows as its description, and its registered model's.

Why: everything a user needs to judge and use a build used to sit in ~30 version tags. The MLflow UI renders a
version's description as markdown, so the card says it in one place — what was quantized (base model and
revision), how (recipe, effective overrides, method), how good it is (perplexity against full precision, stored
bits), where the plots and runs are, how to trace it (``quantpipe lineage``) and how to load each export format
the build has. The tags stay: they are what lookups filter on.

Pure formatting (no MLflow calls); every text goes through :func:`infra.redact.redact` at the end, because a
description is readable by everyone who can reach the tracking server.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from infra.redact import redact

__all__ = ["CARD_SECTIONS", "ModelCard", "registered_model_description"]

CARD_SECTIONS = ("Base model", "Recipe", "Quality", "Plots", "Lineage", "Load it", "Runs")

# How each export format loads; ``{dir}`` is the --out directory, ``{target}`` NAME/VERSION.
_LOADERS: dict[str, tuple[str, str]] = {
    "native": (
        "quantpipe's packed checkpoint (int32 codes, fp16 scales), loaded with its `QuantLinear` modules",
        "from pathlib import Path\nfrom tasks.checkpoint import load_packed_model\n"
        "model = load_packed_model(Path('{dir}'))",
    ),
    "compressed-tensors": (
        "`pack-quantized` compressed-tensors: vLLM, SGLang, transformers",
        "vllm serve {dir}\n# or: AutoModelForCausalLM.from_pretrained('{dir}')",
    ),
    "gptq": (
        "GPTQ (`quant_method: gptq`): vLLM (gptq/Marlin), GPTQModel, transformers + optimum",
        "vllm serve {dir} --quantization gptq\n# or: AutoModelForCausalLM.from_pretrained('{dir}')",
    ),
    "gguf": (
        "GGUF for llama.cpp (`quantpipe export` prints the .gguf file)",
        "llama-cli -m {dir}/model-*.gguf -p 'Hello'\n"
        "# or: AutoModelForCausalLM.from_pretrained('{dir}', gguf_file='<the .gguf name>')",
    ),
}


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


class ModelCard(BaseModel):
    """What a version's card shows; built by ``tasks.register`` from the flow's outcome."""

    name: str
    version: str
    base_model: str
    base_revision: str = ""
    recipe: str = Field(description="Recipe part of the registered name.")
    recipe_digest: str = ""
    recipe_base: str | None = Field(default=None, description="Shipped recipe this one overrides, if any.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted fields that differ from the base.")
    method: str
    bits: int | float
    group_size: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    eval_protocol: str = Field(default="", description="e.g. 'wikitext2, 3 windows x 128 tokens'.")
    gate: str = ""
    formats: list[str] = Field(default_factory=lambda: ["native"])
    plots: dict[str, str | None] = Field(default_factory=dict, description="file name -> URL (None: path only).")
    source_run_id: str | None = None
    source_run_url: str | None = None
    prefect_flow_run_url: str | None = None
    lineage: dict[str, str] = Field(default_factory=dict, description="stage -> <stage>/<key>.")

    @property
    def target(self) -> str:
        return f"{self.name}/{self.version}"

    def markdown(self) -> str:
        m = self.metrics
        ppl, fp = m.get("ppl"), m.get("ppl_fp")
        ratio = ppl / fp if ppl is not None and fp else None
        bits = m.get("bits_per_weight_stored")
        group = f", group {self.group_size}" if self.group_size else ""
        lines = [
            f"# {self.target}",
            "",
            f"`{self.base_model}` quantized by quantpipe with **{self.method}**, {self.bits}-bit codes{group}: "
            f"perplexity **{_fmt(ppl)}** vs **{_fmt(fp)}** full precision at **{_fmt(bits, '.3f')}** stored "
            "bits/weight.",
            "",
            "## Base model",
            "",
            "| | |",
            "|---|---|",
            f"| model | `{self.base_model}` |",
            f"| revision | `{self.base_revision or '-'}` |",
            "",
            "## Recipe",
            "",
            f"`{self.recipe}` (digest `{self.recipe_digest[:16] or '-'}`), method `{self.method}`, {self.bits} bits"
            f"{group}.",
            "",
        ]
        if self.recipe_base and self.overrides:
            lines += [
                f"Shipped recipe `{self.recipe_base}` with these effective overrides:",
                "",
                "```json",
                json.dumps(self.overrides, indent=1, sort_keys=True, default=str),
                "```",
                "",
            ]
        else:
            lines += ["No overrides: the recipe as shipped (or as its own file defines it).", ""]
        lines += [
            "## Quality",
            "",
            "| metric | value |",
            "|---|---|",
            f"| perplexity (quantized) | {_fmt(ppl)} |",
            f"| perplexity (full precision) | {_fmt(fp)} |",
            f"| ratio | {_fmt(ratio, '.4f')}" + (f" ({100 * (ratio - 1):+.1f} %)" if ratio is not None else "") + " |",
            f"| stored bits / weight | {_fmt(bits, '.3f')} |",
        ]
        if self.eval_protocol:
            lines.append(f"| evaluation | {self.eval_protocol} |")
        if self.gate:
            lines.append(f"| promotion gate | {self.gate} |")
        lines += ["", "## Plots", ""]
        if self.plots:
            for file, url in self.plots.items():
                where = f"[{file}]({url})" if url else f"`{file}`"
                lines.append(f"- {where} (artifacts of the source run)")
        else:
            lines.append("- none recorded")
        lines += [
            "",
            "## Lineage",
            "",
            "```bash",
            f"quantpipe lineage {self.target}",
            "```",
            "",
        ]
        if self.lineage:
            lines += ["| stage | artifact |", "|---|---|"]
            lines += [f"| {stage} | `{ref}` |" for stage, ref in sorted(self.lineage.items())]
            lines.append("")
        lines += ["## Load it", ""]
        for fmt in self.formats:
            what, code = _LOADERS.get(fmt, (fmt, "# see quantpipe export --help"))
            out = f"./{self.name}-{self.version}-{fmt}"
            lines += [
                f"**{fmt}**: {what}",
                "",
                "```bash",
                f"quantpipe export {self.target} --format {fmt} --out {out}",
                "```",
                "```" + ("python" if fmt == "native" else "bash"),
                code.format(dir=out, target=self.target),
                "```",
                "",
            ]
        lines += ["## Runs", ""]
        run = self.source_run_id or "-"
        lines.append(
            f"- MLflow source run: [{run}]({self.source_run_url})" if self.source_run_url else f"- MLflow run `{run}`"
        )
        if self.prefect_flow_run_url:
            lines.append(f"- Prefect flow run: {self.prefect_flow_run_url}")
        return redact("\n".join(lines) + "\n")


def registered_model_description(name: str, *, base_model: str, recipe: str, method: str, bits: int | float) -> str:
    """The registered model's description: what the name stands for and how its versions and aliases work."""
    text = f"""# {name}

Quantized builds of `{base_model}` made by quantpipe with recipe `{recipe}` ({method}, {bits}-bit codes).

- Every version is one build (one packed checkpoint); its **description is its model card** (base model and
  revision, recipe and overrides, perplexity vs full precision, stored bits, plots, lineage, how to load each
  export format) and its tags hold the lineage keys that lookups filter on.
- Alias `candidate`: the newest build. Alias `champion`: the best build that passed the recipe's promotion gate,
  evaluated with the same protocol (see the `promotion` tag of each version).
- `quantpipe registry list {name}` lists the versions; `quantpipe lineage {name}/<version>` shows what a build
  was made from.
"""
    return redact(text)
