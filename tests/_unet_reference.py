"""diffusers' UNet3DConditionModel at the tiny preset's shape, plus VideoCrafter2's fps embedding.

diffusers' UNet3D has no fps conditioning; the diffusers port of VideoCrafter2 adds
``fps_embedding(Timesteps(fps))`` after the time embedding's second linear layer (method notes,
section 1). The hook below does exactly that through ``time_embedding.post_act``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet3DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from vinf_jax.config import UNetConfig


def randomize_(module: torch.nn.Module, seed: int) -> None:
  """Non-zero random weights everywhere (also the convs that training zero-initialises)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim >= 2:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
      elif name.endswith("weight"):  # norm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


class ReferenceUNet(torch.nn.Module):
  def __init__(self, cfg: UNetConfig, seed: int = 0):
    """``cfg.time_cond_proj_dim`` > 0 builds diffusers' guidance-embedding projection too (T2V-Turbo)."""
    super().__init__()
    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    self.unet = UNet3DConditionModel(
      sample_size=None,
      in_channels=cfg.in_channels,
      out_channels=cfg.out_channels,
      block_out_channels=chans,
      layers_per_block=cfg.num_res_blocks,
      cross_attention_dim=cfg.context_dim,
      attention_head_dim=cfg.num_head_channels,
      norm_num_groups=cfg.num_groups,
      norm_eps=1e-5,
      time_cond_proj_dim=cfg.time_cond_proj_dim or None,
    )
    self.fps_proj = Timesteps(cfg.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.unet.fps_embedding = TimestepEmbedding(cfg.model_channels, cfg.time_embed_dim)
    randomize_(self.unet, seed)
    self.unet.eval()

  def state_dict_for_conversion(self) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}

  @torch.no_grad()
  def forward(
    self, x: np.ndarray, t: np.ndarray, context: np.ndarray, fps: np.ndarray, timestep_cond: np.ndarray | None = None
  ) -> np.ndarray:
    """x [B, T, H, W, C] (this project's layout) -> eps in the same layout; ``timestep_cond``: the guidance
    embedding [B, time_cond_proj_dim] of a T2V-Turbo UNet."""
    fps_emb = self.unet.fps_embedding(self.fps_proj(torch.from_numpy(fps)))
    self.unet.time_embedding.post_act = lambda h: h + fps_emb
    try:
      xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
      cond = None if timestep_cond is None else torch.from_numpy(np.asarray(timestep_cond, np.float32))
      out = self.unet(
        xt, torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context), timestep_cond=cond
      ).sample
    finally:
      self.unet.time_embedding.post_act = None
    return out.numpy().transpose(0, 2, 3, 4, 1)
