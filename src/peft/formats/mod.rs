//! Adapter file formats: PEFT folders (text and VLM models). kohya / diffusers single files come with
//! the diffusion work.

pub mod lora_file;
pub mod peft;
