"""Zero-shot classification with an image-text model (CLIP, Radford et al. 2021, Sec. 3.1.4; LiT, Zhai et al.
2022): each class is the text embedding of its name in prompt templates, each image goes to the class
whose embedding is most similar. An image without a single ``label`` but with image-level ``labels`` (COCO)
is right when the prediction is any of them.

Class embedding (CLIP's prompt ensembling): for class ``c`` with name ``n_c`` and templates ``t_1..t_T``,
``w_c = normalize(mean_t normalize(text(t(n_c))))``; image embedding ``v = normalize(image(x))``; the
prediction ranks ``v . w_c``. Reports top-1 and top-5 accuracy over the labelled images of a source
whose ``classes`` name the classes (a manifest with class-name labels, ``synthetic:scenes``).

Works for every method with CLIP's towers (CLIP, SLIP, SiLC, AB_CLIP, LiT): the checkpoint's method is
rebuilt from its stored config, its state loaded strictly, and its caption tokenizer read from
``tokenizer.json`` beside the checkpoint. The student's towers are used: they are the ones the CLIP loss
trained together (SiLC's EMA teacher has no text tower).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wildssl.data import collate, open_source
from wildssl.errors import CheckpointError, DataError
from wildssl.eval.features import preprocess_images
from wildssl.io import read_safetensors
from wildssl.models.loading import CHECKPOINT_FORMAT, load_state_strict, metadata_json, resolve_checkpoint
from wildssl.models.tokenizer import TOKENIZER_FILENAME, CaptionTokenizer

# A subset of CLIP's ImageNet prompt templates (Radford et al. 2021, notebook "Prompt_Engineering_for_ImageNet").
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
)


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a text file: one per line with ``{}`` where the class name goes; blank lines
    and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read the prompt templates {path}: {error}") from None
    templates = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise DataError(f"{path}:{number}: template {line!r} must hold '{{}}' exactly once (where the class "
                            "name goes), e.g. 'a photo of a {}.'")
        try:
            line.format("x")  # as the prompts are made: any other brace must be doubled
        except (ValueError, IndexError, KeyError):
            raise DataError(f"{path}:{number}: template {line!r} has a brace besides its '{{}}'; write a literal "
                            "brace as '{{' or '}}'") from None
        templates.append(line)
    if not templates:
        raise DataError(f"{path} holds no prompt templates (one per line, with '{{}}' for the class name)")
    return templates


def load_image_text_model(path: str | os.PathLike):
    """The method of a training checkpoint with its towers (a :class:`~wildssl.methods.clip.CLIP` or
    subclass), state loaded strictly, tokenizer loaded, in eval mode, on the CPU."""
    from wildssl.methods import get_method_class
    from wildssl.methods.clip import CLIP

    path = resolve_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint (format {metadata.get('format')!r}); zero-shot "
                              "needs the text tower, which exports leave out: give the run directory")
    config = metadata_json(metadata, "config", path)
    name = config.get("method", {}).get("name")
    cls = get_method_class(name)
    if not issubclass(cls, CLIP):
        raise CheckpointError(f"{path} is a {name} run, which has no text tower; zero-shot needs an image-text "
                              "model: clip, slip, silc, ab_clip or lit")
    method = cls(config)  # the stored weights replace everything, model.init_from included: it is not read
    load_state_strict(method, {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                      str(path))
    tokenizer_path = path.parent / TOKENIZER_FILENAME
    if not tokenizer_path.is_file():
        raise CheckpointError(f"no {TOKENIZER_FILENAME} beside {path}: the run's caption tokenizer is needed to "
                              "encode the prompts; give the run directory")
    method.tokenizer = method._checked(CaptionTokenizer.load(tokenizer_path), tokenizer_path)
    return method.eval()


@torch.no_grad()
def class_embeddings(method, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``(C, embed_dim)`` l2-normalized ensembled prompt embeddings (module docstring), float32."""
    rows = []
    for name in class_names:
        texts = [template.format(name) for template in templates]
        embedded = F.normalize(method.encode_texts(method.student, texts).float(), dim=-1)
        rows.append(F.normalize(embedded.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zeroshot_classify(method, data: str, templates: Sequence[str] = DEFAULT_TEMPLATES,
                      image_size: int | None = None, batch_size: int = 256, num_workers: int = 0,
                      device: torch.device | str = "cpu") -> dict:
    """Top-1 / top-5 zero-shot accuracy of ``method`` on the labelled images of the data SPEC ``data``.

    Returns ``{"zeroshot_top1", "zeroshot_top5", "num_images", "num_classes", "num_templates"}``; top-5
    is top-``C`` (every class) when there are fewer than 5 classes."""
    image_size = image_size or method.specs[0].size  # the size of the contrastive view the run trained on
    source = open_source(data, load_size=image_size)
    classes = getattr(source, "classes", None)
    if not classes:
        raise DataError(f"{data} has no class names; zero-shot needs them to write the prompts (a .jsonl manifest "
                        "whose labels are class names, or synthetic:scenes)")
    method = method.to(device).eval()
    weights = class_embeddings(method, [c.replace("_", " ") for c in classes], templates).to(device)
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    correct1 = correct5 = total = 0
    k = min(5, len(classes))
    for batch in loader:
        # An image's correct classes: its label, or else its image-level labels (a multi-label photo counts
        # as right when the prediction is any of its labels, the "hit" of multi-label top-k).
        targets = [{label} if label >= 0 else set(labels) for label, labels in
                   zip(batch["label"].tolist(), batch["labels"])]
        keep = [i for i, target in enumerate(targets) if target]
        if not keep:
            continue
        images = preprocess_images(batch["image"][keep].to(device), image_size)
        embedded = F.normalize(method.encode_images(method.student, images).float(), dim=-1)
        ranked = (embedded @ weights.T).topk(k, dim=1).indices.cpu().tolist()
        for row, i in enumerate(keep):
            correct1 += ranked[row][0] in targets[i]
            correct5 += bool(targets[i] & set(ranked[row]))
        total += len(keep)
    if total == 0:
        raise DataError(f"{data} has no labelled images (a label or labels) to classify")
    return {"zeroshot_top1": correct1 / total, "zeroshot_top5": correct5 / total, "num_images": total,
            "num_classes": len(classes), "num_templates": len(templates)}
