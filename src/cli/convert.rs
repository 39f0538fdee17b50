use clap::Args as ClapArgs;
use postforge::peft::formats::lora_file::{LoraFile, LoraFormat};
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// LoRA file to read (kohya/A1111/ComfyUI/LyCORIS LoCon, or diffusers/PEFT; detected).
    input: PathBuf,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    to: LoraFormat,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (file, from) = LoraFile::read(&a.input, None)?;
    file.write(&a.out, a.to)?;
    let dora = file
        .modules
        .values()
        .filter(|m| m.magnitude.is_some())
        .count();
    println!(
        "{} modules ({} with DoRA magnitude): {from:?} -> {:?}, wrote {}",
        file.modules.len(),
        dora,
        a.to,
        a.out.display()
    );
    Ok(())
}
