"""`personae export`: a run's Hugging Face LM as a plain HF model folder (adapter merged) or a PEFT adapter folder.

With ``merge`` the folder is what ``AutoModelForCausalLM.from_pretrained`` and vLLM load: the LM's
``config.json`` and safetensors weights with the character's (or the run's own) LoRA folded in, the
tokenizer files with the chat template, and a ``generation_config.json`` that stops at the chat
template's end-of-turn token and carries the run's recommended sampling. Without it the folder is a
PEFT adapter (:mod:`personae.models.peft_format`) over the LM's local folder (``model.decoder.path``);
when the run changed the LM's own weights (a full fine-tune), those are written beside it in
``base/`` and the adapter points there, since the adapter alone does not reproduce the run.

Only the LM is exported: the image projector has no place in a text-only HF folder, so an exported
model reads text. The run loads as every command loads it (:func:`personae.models.io.load_model`:
checksums verified, the run's own chat tokenizer, which is what the folder gets); runs whose decoder
is personae's own are refused before their weights are read (there is no HF architecture to write).
:func:`character_adapter` lists the run's adapters when the one asked for is not there.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from personae.config import Config, load_config
from personae.data.hf_tokenizer import HFChatTokenizer
from personae.errors import PersonaeError
from personae.files import atomic_directory
from personae.models.adapter_files import attach_adapter, load_verified_adapter
from personae.models.generation_config import FALLBACK, read_generation_config
from personae.models.io import CONFIG_FILE, load_model, require_file
from personae.models.lora import LoRALinear, lora_settings, merge_lora
from personae.models.model import PRETRAINED_DECODERS, PersonaeModel
from personae.models.peft_format import write_peft_adapter

__all__ = ["ExportError", "character_adapter", "export_run", "load_hf_run", "load_run_with_adapter"]

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapters"
BASE_DIR = "base"  # the run's own LM weights, beside a PEFT adapter, when they differ from the folder's


class ExportError(PersonaeError):
    """A run cannot be exported as asked; the message says what export supports or what is there."""


def load_hf_run(run: Path) -> tuple[PersonaeModel, Config, HFChatTokenizer]:
    """The run as :func:`load_model` loads it (verified, its own chat tokenizer), in eval mode; no HF decoder: error."""
    decoder = load_config(require_file(run, CONFIG_FILE)).model.decoder
    if not decoder.enabled or decoder.kind not in PRETRAINED_DECODERS:
        kind = decoder.kind if decoder.enabled else "none (model.decoder.enabled is false)"
        raise ExportError(f"{run}: personae export writes Hugging Face model folders, so it supports runs whose "
                          f"decoder is a Hugging Face LM (model.decoder.kind: hf); this run's decoder is {kind}")
    model, config, tokenizer = load_model(run)
    return model.eval(), config, tokenizer


def character_adapter(run: Path, character: str) -> Path:
    """RUN/adapters/<character>.safetensors; an unknown character lists the adapters the run has."""
    path = Path(run) / ADAPTER_DIR / f"{character}.safetensors"
    if path.is_file():
        return path
    known = sorted(p.stem for p in (Path(run) / ADAPTER_DIR).glob("*.safetensors"))
    raise ExportError(f"no adapter for character {character!r} in {path.parent}; the run has adapters for: "
                      f"{', '.join(known) if known else 'none (personae adapt writes them)'}")


def load_run_with_adapter(run: Path, character: str | None = None
                          ) -> tuple[PersonaeModel, Config, HFChatTokenizer]:
    """The run's model with CHARACTER's adapter on it (None: the run's own weights), its config and tokenizer."""
    model, config, tokenizer = load_hf_run(run)
    if character is not None:  # checksummed like chat's and the server's, LoRA layers added when it brought them
        attach_adapter(model, *load_verified_adapter(character_adapter(run, character)))
    return model, config, tokenizer


def export_run(run: Path, out: Path, *, character: str | None = None, merge: bool = False) -> Path:
    """Write RUN's LM (with CHARACTER's adapter, or the run's own) to OUT: merged HF folder or PEFT adapter."""
    run, out = Path(run), Path(out)
    model, config, tokenizer = load_run_with_adapter(run, character)
    if merge:
        return _write_merged(model, tokenizer, run, out)
    if lora_settings(model) is None and character is not None:
        raise ExportError(f"the adapter of {character!r} in {run} holds whole weights, not LoRA, and the PEFT format "
                          "holds LoRA only: export it with --merge, or adapt with --inner-params lora")
    if lora_settings(model) is None:
        raise ExportError(f"{run} carries no LoRA adapter to write in the PEFT format: give --character ID "
                          "(one of the run's adapters) or --merge for a whole model folder")
    return _write_peft(model, config, out)


def _write_merged(model: PersonaeModel, tokenizer: HFChatTokenizer, run: Path, out: Path) -> Path:
    """config, safetensors weights, tokenizer files with the chat template, generation_config: a plain HF folder."""
    merge_lora(model)
    lm = model.decoder.lm
    generation = _generation_config(lm, tokenizer, run)
    with atomic_directory(out) as staging:
        lm.save_pretrained(staging)
        generation.save_pretrained(staging)
        tokenizer.hf.save_pretrained(staging)
    log.info("wrote the merged model to %s", out)
    return out


def _generation_config(lm: nn.Module, tokenizer: HFChatTokenizer, run: Path):  # -> transformers.GenerationConfig
    """The LM's generation config, stopping at the end-of-turn token, with the run's recommended sampling."""
    generation = copy.deepcopy(lm.generation_config)
    eos = generation.eos_token_id if generation.eos_token_id is not None else lm.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    generation.eos_token_id = sorted({*eos, tokenizer.eos_id})
    generation.pad_token_id = tokenizer.pad_id
    defaults = read_generation_config(run, FALLBACK)
    sampled = defaults.temperature > 0
    generation.do_sample = sampled
    generation.max_new_tokens = defaults.max_new_tokens
    generation.repetition_penalty = defaults.repetition_penalty
    if sampled:
        generation.temperature, generation.top_p = defaults.temperature, defaults.top_p
        generation.top_k = defaults.top_k or None
    else:  # greedy: sampling fields would be flagged by transformers' validation
        generation.temperature = generation.top_p = generation.top_k = None
    return generation


def _write_peft(model: PersonaeModel, config: Config, out: Path) -> Path:
    """The PEFT adapter folder; the run's own LM weights in OUT/base when they are not the folder's."""
    base_folder = Path(config.model.decoder.path).resolve()
    if _lm_matches_folder(model, base_folder):
        return write_peft_adapter(model, out, base_folder)
    log.info("the run's LM weights differ from %s: writing them to %s/%s for the adapter", base_folder, out, BASE_DIR)
    plain = copy.deepcopy(model)
    for module in plain.modules():  # the base without any adapter
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                module.lora_B.zero_()
    merge_lora(plain)
    write_peft_adapter(model, out, (out / BASE_DIR).resolve())
    plain.decoder.lm.save_pretrained(out / BASE_DIR)
    return out


def _lm_matches_folder(model: PersonaeModel, folder: Path) -> bool:
    """Whether every tensor in the folder's safetensors files equals the run's LM's (LoRA layers unwrapped)."""
    state = {name.replace(".base.", "."): value for name, value in model.decoder.lm.state_dict().items()
             if not name.rsplit(".", 1)[-1].startswith("lora_")}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return False
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key not in state or not torch.equal(f.get_tensor(key).to(state[key]), state[key]):
                    return False
    return True
