"""Diffusion: noise schedules, forward noising, training targets, DDPM/DDIM samplers."""
from mmjax.diffusion.samplers import (guided_prediction, make_sampler, sample,
                                      sampling_timesteps)
from mmjax.diffusion.schedules import (Schedule, cosine_alphas_cumprod, cosine_betas,
                                       diffusion_loss, linear_betas, loss_weight, make_schedule,
                                       prediction_from_x0_eps, q_sample, sample_timesteps,
                                       scaled_linear_betas, schedule_from_betas, snr,
                                       training_target, x0_eps_from_prediction)

__all__ = ["Schedule", "cosine_alphas_cumprod", "cosine_betas", "diffusion_loss",
           "guided_prediction", "linear_betas", "loss_weight", "make_sampler", "make_schedule",
           "prediction_from_x0_eps", "q_sample", "sample", "sample_timesteps",
           "sampling_timesteps", "scaled_linear_betas", "schedule_from_betas", "snr",
           "training_target", "x0_eps_from_prediction"]
