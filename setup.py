from setuptools import find_packages, setup

setup(
    name="fairseq-agg",
    version="0.2.0",
    description="Adaptive Gradient Gating (Yu et al., ACL 2022) as a fairseq plug-in",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_agg", "fairseq_agg.*"]),
    package_data={"fairseq_agg": ["config/*/*.yaml"]},
    python_requires=">=3.8",
    install_requires=[
        # fairseq 0.12.2 does not build on Python 3.11; the fairseq-fixed distribution
        # installs the same `fairseq` module there.
        'fairseq-fixed==0.12.3.1; python_version >= "3.11"',
        'fairseq==0.12.2; python_version < "3.11"',
        # The releases scripts/check-torch-version.sh passed on: 2.6 (the first with weights-only
        # torch.load by default, which the checkpoint allow-list is for, and FSDP2's public
        # fully_shard) to 2.15. With torch < 2.11, install the same torchaudio release first:
        # fairseq's unpinned torchaudio otherwise resolves to one that upgrades torch.
        "torch>=2.6,<2.16",
        "numpy",
        # evaluation suite and data preparation
        "scipy",
        "sacrebleu>=2.0",
        "matplotlib",
        "tqdm",
        "sacremoses",
        "subword-nmt",
        "sentencepiece",
    ],
    extras_require={
        "test": ["pytest", "isoscore"],  # isoscore: the reference IsoScore is compared against
        # fairseq_agg.hf (AggTrainer); tested with transformers 5.24 and accelerate 1.15
        "hf": ["transformers>=5.0", "accelerate>=0.26"],
        # the documentation site (mkdocs build --strict runs in the test suite)
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    entry_points={
        "console_scripts": [
            "fairseq-agg-demo = fairseq_agg.demo:main",
            "fairseq-agg-eval = fairseq_agg.eval:main",
        ]
    },
)
