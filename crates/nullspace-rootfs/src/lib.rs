//! nullspace-rootfs
