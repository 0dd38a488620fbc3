//! Helpers shared by the root test crates.
pub mod seg_cli;
pub mod torchvision;
