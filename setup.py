from setuptools import find_packages, setup

setup(
    name="lora-ipc",
    version="0.1.0",
    description="Move LoRA adapters from a trainer into a running vLLM engine through GPU/shared memory",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lora_ipc", "lora_ipc.*"]),
    install_requires=["torch>=2.5", "pyzmq>=25", "msgpack>=1.0"],
    extras_require={
        "peft": ["peft>=0.13"],
        "ray": ["ray>=2.40", "numpy"],
        "test": ["pytest>=8", "peft>=0.13", "transformers", "safetensors", "hypothesis", "psutil"],
    },
    entry_points={
        "console_scripts": ["lora-ipc=lora_ipc.cli:main"],
        "vllm.general_plugins": ["lora_ipc=lora_ipc.vllm.plugin:register"],
    },
)
