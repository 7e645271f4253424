"""The models a server may load, by name only: the files in its models folder, the bundled model and
the one given with --model. A request names a model; it never gives a path.

Names are paths relative to the models folder ("sub/model.safetensors"), as the web UI's checkpoint
titles are. Only what a scan of the folder found can be loaded, so `../x`, `/etc/x` and the like are
refused before anything touches the disk; a symlink whose target lies outside the folder is left
out of the scan. LoRAs, embeddings and VAEs live in the web UI's subfolders (`Lora/`,
`embeddings/`, `VAE/`), which the checkpoint scan skips; a VAE may also sit beside the checkpoints as
`<name>.vae.safetensors` (or `.vae.pt`, `.vae.ckpt`), which the web UI's "Automatic" VAE picks for the
checkpoint of the same name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .. import bundled
from ..errors import InputError
from ..hashes import SHORT_HASH_DIGITS, file_sha256

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_FOLDERS = ("Lora", "lora", "loras", "LyCORIS")
EMBEDDING_FOLDERS = ("embeddings",)
VAE_FOLDERS = ("VAE", "vae")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
VAE_BESIDE_SUFFIXES = tuple(".vae" + suffix for suffix in VAE_SUFFIXES)  # model.vae.safetensors
VAE_AUTOMATIC, VAE_NONE = "Automatic", "None"  # the web UI's sd_vae choices besides the files


class UnknownModelError(InputError):
    """A model name that is not in the server's list."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # "sub/model.safetensors": what requests use
    path: str  # absolute; never shown to a request as something it may send back

    @property
    def model_name(self) -> str:
        """The web UI's model_name: the name without its extension, folders joined by '_'."""
        return os.path.splitext(self.name.replace("/", "_"))[0]

    @property
    def sha256(self) -> Optional[str]:
        return file_sha256(self.path) if os.path.isfile(self.path) else None

    @property
    def short_hash(self) -> Optional[str]:
        digest = self.sha256
        return digest[:SHORT_HASH_DIGITS] if digest else None

    @property
    def title(self) -> str:
        """The web UI's checkpoint title: "name [short hash]"."""
        short = self.short_hash
        return f"{self.name} [{short}]" if short else self.name


def inside(root: str, path: str) -> bool:
    """Whether `path`, with every symlink resolved, lies in `root` (also resolved)."""
    root, path = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([root, path]) == root


def scan_files(root: Optional[str], suffixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(name relative to root, absolute path) of the files under `root` with one of `suffixes`,
    sorted; subfolders named in `skip` (at the top) and links leading out of `root` are left out."""
    if not root or not os.path.isdir(root):
        return []
    found = []
    for folder, subfolders, files in os.walk(root):
        if os.path.samefile(folder, root):
            subfolders[:] = [d for d in subfolders if d not in skip]
        subfolders[:] = [d for d in subfolders if inside(root, os.path.join(folder, d)) and not d.startswith(".")]
        for file in files:
            path = os.path.join(folder, file)
            if file.lower().endswith(suffixes) and not file.startswith(".") and inside(root, path):
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), os.path.abspath(path)))
    return sorted(found)


def subfolders(root: Optional[str], names: tuple[str, ...]) -> list[str]:
    if not root:
        return []
    return [os.path.join(root, name) for name in names if os.path.isdir(os.path.join(root, name))
            and inside(root, os.path.join(root, name))]


class ModelFolder:
    """The server's list of loadable models; `refresh()` scans the folder again."""

    def __init__(self, models_dir: Optional[str], model: Optional[str] = None):
        self.models_dir = os.path.abspath(models_dir) if models_dir else None
        if self.models_dir and not os.path.isdir(self.models_dir):
            raise InputError(f"--models-dir {models_dir} is not a folder")
        self._extra = self._command_line_model(model)
        self.entries: list[ModelEntry] = []
        self.refresh()

    def _command_line_model(self, model: Optional[str]) -> list[ModelEntry]:
        """--model: a name in the models folder (found by the scan), else a file or folder of its own."""
        if model is None:
            return []
        if self.models_dir and os.path.exists(os.path.join(self.models_dir, model)):
            return []
        if not os.path.exists(model):
            raise InputError(f"--model {model}: no such file or folder")
        return [ModelEntry(os.path.basename(os.path.normpath(model)), os.path.abspath(model))]

    def refresh(self) -> None:
        entries = [ModelEntry(name, path) for name, path in
                   scan_files(self.models_dir, CHECKPOINT_SUFFIXES, LORA_FOLDERS + EMBEDDING_FOLDERS + VAE_FOLDERS)
                   if not name.lower().endswith(VAE_BESIDE_SUFFIXES)]
        names = {entry.name for entry in entries}
        for entry in self._extra + self._bundled():
            if entry.name not in names:
                entries.append(entry)
                names.add(entry.name)
        self.entries = entries

    @staticmethod
    def _bundled() -> list[ModelEntry]:
        """The bundled text-to-image and inpainting models (the upscaler serves extras, not generation)."""
        paths = [path for path in (bundled.BUNDLED_MODEL, bundled.BUNDLED_INPAINTING) if os.path.isfile(path)]
        return [ModelEntry(os.path.basename(path), path) for path in paths]

    def default(self, model: Optional[str]) -> Optional[ModelEntry]:
        """The model to load first: --model, else the bundled one, else the first in the folder."""
        if model is not None:
            name = os.path.basename(os.path.normpath(model)) if self._extra else model
            return self.find(name)
        bundled_name = os.path.basename(bundled.BUNDLED_MODEL)
        for entry in self.entries:
            if entry.name == bundled_name and entry.path == bundled.BUNDLED_MODEL:
                return entry
        return self.entries[0] if self.entries else None

    def find(self, name: str) -> ModelEntry:
        """The entry called `name`: its name, title, model_name or short hash, as the web UI accepts."""
        text = str(name).strip()
        if not text:
            raise UnknownModelError("the model name is empty; give a name from GET /sdapi/v1/sd-models")
        if text.startswith(("/", "\\")) or ".." in text.replace("\\", "/").split("/") or ":" in text[:3]:
            raise UnknownModelError(f"model '{text}' refused: models are chosen by name from the server's models "
                                    "folder, never by path; see GET /sdapi/v1/sd-models")
        without_hash = text.rsplit(" [", 1)[0] if text.endswith("]") else text
        for entry in self.entries:
            if without_hash in (entry.name, entry.model_name, os.path.splitext(entry.name)[0]):
                return entry
        for entry in self.entries:
            if text in (entry.title, entry.short_hash, entry.sha256):
                return entry
        known = ", ".join(entry.name for entry in self.entries) or "none"
        raise UnknownModelError(f"model '{text}' not found; the server has: {known}")

    def loras(self) -> list[tuple[str, str]]:
        """(name, path) of the LoRA files; the name is the file's stem, as prompts' <lora:name:w> use it."""
        found = []
        for folder in subfolders(self.models_dir, LORA_FOLDERS):
            found += [(os.path.splitext(os.path.basename(name))[0], path) for name, path in scan_files(folder, LORA_SUFFIXES)]
        return found

    def lora_folders(self) -> list[str]:
        return subfolders(self.models_dir, LORA_FOLDERS)

    def find_lora(self, name: str) -> str:
        for stem, path in self.loras():
            if stem == name:
                return path
        known = ", ".join(stem for stem, _ in self.loras()) or "none"
        raise InputError(f"LoRA '{name}' not found; the server has: {known} (see GET /api/v1/loras)")

    def embeddings(self) -> list[str]:
        """Paths of the textual-inversion files."""
        return [path for folder in subfolders(self.models_dir, EMBEDDING_FOLDERS)
                for _, path in scan_files(folder, EMBEDDING_SUFFIXES)]

    def vaes(self) -> list[tuple[str, str]]:
        """(name, path) of the VAE files: those in VAE/ by their path there, those beside the checkpoints
        (`*.vae.safetensors`) by their path in the models folder; sorted by name."""
        found = [entry for folder in subfolders(self.models_dir, VAE_FOLDERS)
                 for entry in scan_files(folder, VAE_SUFFIXES)]
        skip = LORA_FOLDERS + EMBEDDING_FOLDERS + VAE_FOLDERS
        found += [entry for entry in scan_files(self.models_dir, VAE_BESIDE_SUFFIXES, skip)]
        return sorted(found)

    def check_vae(self, choice: str) -> str:
        """`choice` when it is "Automatic", "None" or a VAE's name; else UnknownModelError listing them."""
        text = str(choice).strip()
        if text in (VAE_AUTOMATIC, VAE_NONE) or text in (name for name, _ in self.vaes()):
            return text
        known = ", ".join([VAE_AUTOMATIC, VAE_NONE] + [name for name, _ in self.vaes()])
        raise UnknownModelError(f"VAE '{text}' not found; choose one of: {known} (GET /sdapi/v1/sd-vae)")

    def vae_for(self, entry: Optional[ModelEntry], choice: str) -> Optional[str]:
        """The VAE file a model loads with for the sd_vae `choice`; None: the model's own VAE.
        "Automatic" takes the file beside the checkpoint with its name (model.vae.safetensors), as the
        web UI does; "None" always keeps the model's own."""
        vaes = self.vaes()
        if choice == VAE_NONE:
            return None
        if choice == VAE_AUTOMATIC:
            if entry is None:
                return None
            stem = os.path.splitext(entry.path)[0]
            return next((path for _, path in vaes if path.lower() in
                         (stem.lower() + suffix for suffix in VAE_BESIDE_SUFFIXES)), None)
        for name, path in vaes:
            if name == choice:
                return path
        raise UnknownModelError(f"VAE '{choice}' is no longer in the models folder; see GET /sdapi/v1/sd-vae")
