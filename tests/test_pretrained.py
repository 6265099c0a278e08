"""The offline pretrained backbone really is ImageNet-trained."""

import pytest
import skimage.data
import torch
from PIL import Image
from torchvision.models._meta import _IMAGENET_CATEGORIES

from training.core.networks.registry import build_network


@pytest.mark.slow
def test_efficientnet_lite0_loads_offline_and_recognises_a_cat():
    model = build_network("efficientnet_lite0").eval()
    assert model.weights_info.source == "package" and len(model.weights_info.sha256) == 64
    images = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    batch = torch.stack([model.preprocessing(image) for image in images])
    with torch.inference_mode():
        probabilities = model.classify(batch).softmax(dim=1)
        embeddings = model(batch)
    top = [_IMAGENET_CATEGORIES[i] for i in probabilities.argmax(dim=1)]
    assert top == ["Egyptian cat", "espresso"]
    assert probabilities.max(dim=1).values.min() > 0.5
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
