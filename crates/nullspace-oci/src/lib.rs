//! nullspace-oci
