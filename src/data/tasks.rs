//! Procedural instruction tasks with checkable answers, for the embedded `tiny-chat` model: addition,
//! copying, sorting, word reversal and facts about a generated world, plus tasks held back for
//! fine-tuning (the largest number, subtraction). Every example is drawn from a seed.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Task kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// `What is a + b?`
    Add,
    /// `Repeat exactly: …`
    Copy,
    /// `Sort these numbers: …`
    Sort,
    /// `Reverse the words: …`
    Reverse,
    /// `What is the capital of …?` and other world facts.
    Fact,
    /// `Which number is largest: …?` (not in pretraining: taught by fine-tuning).
    Max,
    /// `What is a - b?` (not in pretraining).
    Subtract,
}

impl TaskKind {
    /// The pretraining mix.
    pub const PRETRAIN: [TaskKind; 5] =
        [Self::Add, Self::Copy, Self::Sort, Self::Reverse, Self::Fact];

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "add" => Self::Add,
            "copy" => Self::Copy,
            "sort" => Self::Sort,
            "reverse" => Self::Reverse,
            "fact" => Self::Fact,
            "max" => Self::Max,
            "subtract" => Self::Subtract,
            _ => return None,
        })
    }

    /// The name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Copy => "copy",
            Self::Sort => "sort",
            Self::Reverse => "reverse",
            Self::Fact => "fact",
            Self::Max => "max",
            Self::Subtract => "subtract",
        }
    }
}

/// One instruction with its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExample {
    /// Kind.
    pub kind: TaskKind,
    /// The user's message.
    pub prompt: String,
    /// The expected reply.
    pub answer: String,
}

impl TaskExample {
    /// Whether a generated reply is right (surrounding whitespace and a final period ignored).
    pub fn check(&self, reply: &str) -> bool {
        let norm = |s: &str| s.trim().trim_end_matches('.').trim().to_lowercase();
        norm(reply) == norm(&self.answer)
    }

    /// As a TRL conversational prompt-completion JSON line.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt": [{"role": "user", "content": self.prompt}],
            "completion": [{"role": "assistant", "content": self.answer}],
            "task": self.kind.name(),
        })
    }
}

const WORDS: [&str; 24] = [
    "apple", "river", "stone", "cloud", "tiger", "lamp", "green", "paper", "ocean", "wind",
    "honey", "maple", "silver", "candle", "forest", "piano", "rocket", "garden", "violet",
    "winter", "copper", "meadow", "falcon", "pepper",
];
const SYLLABLES: [&str; 12] = [
    "ka", "lor", "mi", "ven", "tu", "ra", "zel", "do", "bri", "sa", "nor", "quel",
];
const COLORS: [&str; 6] = ["red", "blue", "green", "gold", "white", "black"];
const ANIMALS: [&str; 6] = ["fox", "owl", "bear", "horse", "eagle", "wolf"];

/// A generated world: countries with a capital, a flag colour and a national animal.
#[derive(Debug, Clone)]
pub struct World {
    /// (country, capital, colour, animal).
    pub countries: Vec<(String, String, String, String)>,
}

fn name(rng: &mut ChaCha8Rng, parts: usize) -> String {
    let mut s: String = (0..parts)
        .map(|_| *SYLLABLES.choose(rng).unwrap_or(&"ka"))
        .collect();
    if let Some(f) = s.get(..1) {
        s = f.to_uppercase() + &s[1..];
    }
    s
}

impl World {
    /// `n` countries from `seed` (names are unique).
    pub fn new(n: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut countries: Vec<(String, String, String, String)> = vec![];
        while countries.len() < n {
            let c = name(&mut rng, 3);
            let cap = name(&mut rng, 2);
            if countries.iter().any(|x| x.0 == c || x.1 == cap) {
                continue;
            }
            countries.push((
                c,
                cap,
                COLORS.choose(&mut rng).unwrap_or(&"red").to_string(),
                ANIMALS.choose(&mut rng).unwrap_or(&"fox").to_string(),
            ));
        }
        Self { countries }
    }
}

/// One example of `kind` from `rng`.
pub fn example(kind: TaskKind, world: &World, rng: &mut ChaCha8Rng) -> TaskExample {
    let nums = |rng: &mut ChaCha8Rng, n: usize| -> Vec<u32> {
        (0..n).map(|_| rng.random_range(0..100)).collect()
    };
    let join = |v: &[u32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (prompt, answer) = match kind {
        TaskKind::Add => {
            let (a, b) = (rng.random_range(0..100u32), rng.random_range(0..100u32));
            (format!("What is {a} + {b}?"), (a + b).to_string())
        }
        TaskKind::Subtract => {
            let (a, b) = (rng.random_range(0..100u32), rng.random_range(0..100u32));
            let (a, b) = (a.max(b), a.min(b));
            (format!("What is {a} - {b}?"), (a - b).to_string())
        }
        TaskKind::Copy | TaskKind::Reverse => {
            let n = rng.random_range(2..5);
            let w: Vec<&str> = (0..n)
                .map(|_| *WORDS.choose(rng).unwrap_or(&"apple"))
                .collect();
            if kind == TaskKind::Copy {
                (format!("Repeat exactly: {}", w.join(" ")), w.join(" "))
            } else {
                let r: Vec<&str> = w.iter().rev().copied().collect();
                (format!("Reverse the words: {}", w.join(" ")), r.join(" "))
            }
        }
        TaskKind::Sort | TaskKind::Max => {
            let n = rng.random_range(3..6);
            let v = nums(rng, n);
            if kind == TaskKind::Sort {
                let mut s = v.clone();
                s.sort();
                (format!("Sort these numbers: {}", join(&v)), join(&s))
            } else {
                let m = v.iter().copied().max().unwrap_or(0);
                (
                    format!("Which number is largest: {}?", join(&v)),
                    m.to_string(),
                )
            }
        }
        TaskKind::Fact => {
            let c = &world.countries[rng.random_range(0..world.countries.len())];
            match rng.random_range(0..3) {
                0 => (format!("What is the capital of {}?", c.0), c.1.clone()),
                1 => (format!("What colour is the flag of {}?", c.0), c.2.clone()),
                _ => (
                    format!("What is the national animal of {}?", c.0),
                    c.3.clone(),
                ),
            }
        }
    };
    TaskExample {
        kind,
        prompt,
        answer,
    }
}

/// `n` examples drawn evenly from `kinds` (seeded).
pub fn corpus(kinds: &[TaskKind], n: usize, world: &World, seed: u64) -> Vec<TaskExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| example(kinds[i % kinds.len().max(1)], world, &mut rng))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_correct_and_seeded() {
        let w = World::new(8, 1);
        assert_eq!(w.countries.len(), 8);
        let a = corpus(&TaskKind::PRETRAIN, 50, &w, 3);
        assert_eq!(a, corpus(&TaskKind::PRETRAIN, 50, &w, 3));
        for e in &a {
            assert!(e.check(&e.answer) && e.check(&format!(" {}. ", e.answer)));
            match e.kind {
                TaskKind::Add => {
                    let p: Vec<u32> = e
                        .prompt
                        .trim_start_matches("What is ")
                        .trim_end_matches('?')
                        .split(" + ")
                        .map(|x| x.parse().unwrap())
                        .collect();
                    assert_eq!(e.answer, (p[0] + p[1]).to_string());
                }
                TaskKind::Sort => {
                    let v: Vec<u32> = e.answer.split(' ').map(|x| x.parse().unwrap()).collect();
                    assert!(v.windows(2).all(|w| w[0] <= w[1]));
                }
                _ => {}
            }
        }
        let m = example(TaskKind::Max, &w, &mut ChaCha8Rng::seed_from_u64(2));
        assert!(m.prompt.starts_with("Which number is largest"));
        assert!(!m.check("nonsense"));
    }
}
