//! Kernel-parity scenarios (being written).
