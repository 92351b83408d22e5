"""Patched guest kernels under qemu: build, rootfs, boot, validate."""
