import torch

from scratch_diffusion.models import UNet2DDenoiser, build_unet


def test_unet2d_matches_the_lesson():
    unet = build_unet(sample_size=28, channels=1)
    assert sum(p.numel() for p in unet.parameters()) == 1_707_009
    model = UNet2DDenoiser(unet)
    assert model(torch.randn(2, 1, 28, 28), torch.tensor([10, 500])).shape == (2, 1, 28, 28)


def test_conditioning_modes_reach_the_time_embedding():
    torch.manual_seed(0)
    unet = build_unet(
        (32, 32), 1, ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"), sample_size=28, channels=1
    ).eval()
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        timestep = UNet2DDenoiser(unet, "timestep")(x, t)
        none = UNet2DDenoiser(unet, "none")(x, t)
        amount = UNet2DDenoiser(unet, "amount")(x, t / 1000)
        torch.testing.assert_close(none, unet(x, torch.zeros(2)).sample)
        torch.testing.assert_close(amount, timestep)  # amount * 1000 is the same embedding input
    assert not torch.allclose(timestep, none)
