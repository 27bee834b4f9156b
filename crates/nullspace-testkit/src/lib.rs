//! nullspace-testkit
