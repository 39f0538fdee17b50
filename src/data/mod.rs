//! Data: procedural captioned images (the tiny-sd corpus and style sets) with a detector that checks
//! what a sampled image shows, and kohya-style image folders with caption files.

pub mod buckets;
pub mod chat;
pub mod image_folder;
pub mod masks;
pub mod pref;
pub mod sft;
pub mod shapes;
pub mod tasks;
pub mod text;
