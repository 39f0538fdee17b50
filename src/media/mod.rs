//! Pictures people look at: loss curves, labeled evaluation grids, image I/O.

pub mod grid;
pub mod image;
pub mod plot;
