"""A task batch's conditions as the denoiser receives them: text states, the condition image in the
model's space (pixels or VAE latents), class labels — and the null conditions (InstructPix2Pix's
embedding of "" and no class) that dropout and guidance fall back to.
"""

from __future__ import annotations

from genperc.diffusion.conditioning import Conditioning


def make_conditioning(task_batch, text_encoder, space, device) -> Conditioning:
    """A task batch's conditions on ``device``: text states, the image in the model's space, labels."""
    text = mask = None
    if task_batch.texts is not None and text_encoder is not None:
        text, mask = text_encoder.encode(task_batch.texts)
        text, mask = text.to(device), mask.to(device)
    image = space.encode(task_batch.image.to(device)) if task_batch.image is not None else None
    labels = task_batch.class_labels.to(device) if task_batch.class_labels is not None else None
    return Conditioning(text=text, text_mask=mask, image=image, class_labels=labels)


def null_conditioning(text_encoder, device) -> Conditioning:
    """The null text (embedding of "", InstructPix2Pix) used by dropout and guidance."""
    if text_encoder is None:
        return Conditioning()
    text, mask = text_encoder.null()
    return Conditioning(text=text.to(device), text_mask=mask.to(device))
