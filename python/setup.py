"""The wheel carries libv2l.so, a native library, so it is a platform wheel: `py3-none-<platform>`.

Any CPython 3 can load it through ctypes (there is no extension module, hence `py3-none`), but it
only runs on the platform it was built for. scripts/build-wheel.sh builds the library, copies it
into v2l/ and runs this; `auditwheel repair` then turns the `linux_*` tag into a manylinux one.
"""

from setuptools import setup
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel


class PlatformWheel(bdist_wheel):
    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


class NativeDistribution(Distribution):
    def has_ext_modules(self):
        return True


setup(cmdclass={"bdist_wheel": PlatformWheel}, distclass=NativeDistribution)
