from setuptools import find_packages, setup

setup(
    name="gittornado",
    version="0.1.0",
    description="Serve git repositories over HTTP (smart and dumb protocols) from Tornado",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["gittornado", "gittornado.*"]),
    python_requires=">=3.11",  # as Tornado 6.6 requires
    install_requires=[
        # 6.6: the oldest that refuses folded headers and answers a badly terminated chunk (see .ci/run)
        "tornado>=6.6,<7",
        # passlib's maintained fork (imported as passlib): htpasswd's hash formats
        "libpass>=1.9",
        "bcrypt>=4.1",
    ],
    extras_require={
        "metrics": ["prometheus-client>=0.17"],
        "test": ["pytest>=7", "pytest-tornado>=0.8", "hypothesis>=6", "prometheus-client>=0.17"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "gittornado=gittornado.server:main",
            "gittornado-passwd=gittornado.passwd:main",
        ]
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Framework :: Tornado",
        "Topic :: Software Development :: Version Control :: Git",
    ],
)
