//! Project-wide checks (the import tiers), command-line behaviour, bad input, media and shapes.
//!
//! One test binary per capability (fewer executables to link); each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod bad_input;
mod edit;
mod media;
mod ranges;
mod shapes;
