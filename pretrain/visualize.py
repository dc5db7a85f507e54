"""MAE reconstructions for TensorBoard: rows of original / masked / reconstruction (visible patches pasted)."""
import torch
from torchvision.utils import make_grid

from pretrain.mae import MaskedAutoencoderViT
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def reconstruction_grid(mae: MaskedAutoencoderViT, images: torch.Tensor, noise: torch.Tensor,
                        mask_ratio: float) -> torch.Tensor:
    """A CHW image in [0, 1]: one row per sample, columns original | masked | reconstruction."""
    was_training = mae.training
    mae.eval()
    dtype = mae.patch_embed.proj.weight.dtype  # bf16 under DeepSpeed's bf16 mode
    latent, mask, ids_restore = mae.forward_encoder(images.to(dtype), mask_ratio, noise)
    pred = mae.forward_decoder(latent, ids_restore).float()
    images, mask = images.float(), mask.float()
    if mae.norm_pix_loss:  # predictions are per-patch normalised: undo with the target's statistics
        target = mae.patchify(images)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    recon = mae.unpatchify(pred)
    pixel_mask = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)

    def pixels(x):
        return (x * std + mean).clamp(0, 1)
    masked = pixels(images) * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = pixels(images) * (1 - pixel_mask) + pixels(recon) * pixel_mask
    rows = torch.stack([pixels(images), masked, pasted], dim=1).flatten(0, 1)
    mae.train(was_training)
    return make_grid(rows.cpu(), nrow=3, padding=1)
