"""DINOv2 conditioner (tiny random config) and image preprocessing."""
import numpy as np
import pytest
import torch

from d3ds2.models.conditioner import ImageConditioner, estimate_foreground, preprocess_image

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=518, patch_size=14, num_register_tokens=4)


@pytest.fixture(scope="module")
def conditioner():
    torch.manual_seed(0)
    return ImageConditioner(config=TINY)


def rgba_square(h=300, w=200):
    img = np.zeros((h, w, 4), np.uint8)
    img[50:150, 60:120] = (200, 30, 30, 255)
    return img


def test_preprocess_alpha_crop_white_background():
    x = preprocess_image(rgba_square())
    assert x.shape == (4, 518, 518)
    fg = x[3] > 0
    # the 100x60 foreground is cropped, padded to square, fit to 518 with a 16 px margin: height spans 518 * 486 / 518
    rows = fg.any(1).nonzero()
    assert abs((rows.max() - rows.min() + 1).item() - 486) <= 2
    far = ~torch.nn.functional.max_pool2d(fg[None, None].float(), 21, 1, 10)[0, 0].bool()
    assert far.sum() > 1000 and torch.allclose(x[:3, far], torch.ones(1))  # background is white
    assert torch.allclose(x[:3, fg].mean(1), torch.tensor([200, 30, 30]) / 255, atol=0.02)


def test_preprocess_fallback_without_alpha():
    img = np.full((100, 100, 3), 255, np.uint8)
    img[20:60, 30:50] = (10, 200, 10)
    mask = estimate_foreground(img.astype(np.float32) / 255)
    assert mask.sum() == 40 * 20
    x = preprocess_image(img)
    assert x[3].sum() > 0 and torch.allclose(x[:3, :, :10], torch.ones(1))


def test_dense_tokens_are_prenorm_layernormed(conditioner):
    images = torch.rand(2, 3, 518, 518)
    tokens = conditioner(images)
    assert tokens.shape == (2, 1 + 4 + 37 * 37, 32) == (2, conditioner.num_tokens, 32)
    pix = (images - conditioner.mean) / conditioner.std
    hidden = conditioner.backbone(pixel_values=pix, output_hidden_states=True).hidden_states[-1]
    ref = (hidden - hidden.mean(-1, keepdim=True)) / torch.sqrt(hidden.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens[1:], conditioner(images[1:]))  # batch independent


def test_sparse_tokens_keep_foreground_patches(conditioner):
    tokens = torch.randn(2, conditioner.num_tokens, 32)
    masks = torch.zeros(2, 1, 518, 518)
    masks[0, 0, 14 * 3 + 5, 14 * 7] = 1  # patch (row 3, col 7)
    masks[1, 0, :28, :] = 1  # the first two patch rows
    cond = conditioner.sparse(tokens, masks)
    assert cond.offsets.tolist() == [0, 6, 6 + 5 + 74]
    torch.testing.assert_close(cond.feats[:5], tokens[0, :5])
    torch.testing.assert_close(cond.feats[5], tokens[0, 5 + 3 * 37 + 7])
    assert cond.pos[5].tolist() == [7, 3, 0] and cond.pos[0].tolist() == [0, 0, 1]


def test_missing_weights_error_names_the_fix(tmp_path):
    with pytest.raises(OSError, match="local directory"):
        ImageConditioner(backbone=str(tmp_path / "nope"))
