//! Training data: image folders with optional labels, a fixed train/evaluation split, and a
//! seeded sampler of random crops and flips.
//!
//! **The split** is decided per file by its name alone: a file is in the evaluation part when
//! `FNV-1a-64(file name) mod 100 < eval_percent`. It needs no list, does not change when files are
//! added or removed, and is the same on every machine — so evaluation images never enter
//! training, whoever trains.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::image_io::load_image;
use crate::init::SplitMix64;
use crate::{Error, Result};

/// Which part of a folder a file belongs to (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Used for training.
    Train,
    /// Never used for training; evaluation only.
    Eval,
}

/// The split of a file name for a given evaluation percentage (0..=100).
pub fn split_of(file_name: &str, eval_percent: u32) -> Split {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in file_name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    if h % 100 < eval_percent as u64 {
        Split::Eval
    } else {
        Split::Train
    }
}

/// A folder of PNG/JPEG images, sorted by name, with the class index of each file when the
/// folder has a `labels.json` (`{"file.jpg": {"index": 0, ...}, ...}`).
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The image files, sorted by name.
    pub files: Vec<PathBuf>,
    /// Class index per file name, when labelled.
    pub labels: Option<BTreeMap<String, usize>>,
    /// Caption per file name, from `captions.json` (`{"file.jpg": "a caption", ...}`; a list
    /// of captions gives the first), when the folder has one.
    pub captions: Option<BTreeMap<String, String>>,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl ImageFolder {
    /// Lists the images of `dir` and reads its `labels.json` if present.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
                    .unwrap_or(false)
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} holds no PNG or JPEG images",
                dir.display()
            )));
        }
        let labels_path = dir.join("labels.json");
        let labels = if labels_path.exists() {
            let text =
                std::fs::read_to_string(&labels_path).map_err(|e| Error::io(&labels_path, e))?;
            let json: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", labels_path.display())))?;
            let mut map = BTreeMap::new();
            for (name, v) in json {
                let index = v.get("index").and_then(|i| i.as_u64()).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{}: {name} has no class index",
                        labels_path.display()
                    ))
                })?;
                map.insert(name, index as usize);
            }
            Some(map)
        } else {
            None
        };
        let captions_path = dir.join("captions.json");
        let captions = if captions_path.exists() {
            let text = std::fs::read_to_string(&captions_path)
                .map_err(|e| Error::io(&captions_path, e))?;
            let json: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", captions_path.display())))?;
            let mut map = BTreeMap::new();
            for (name, v) in json {
                let caption = match &v {
                    serde_json::Value::String(c) => Some(c.clone()),
                    serde_json::Value::Array(list) => {
                        list.first().and_then(|c| c.as_str()).map(str::to_string)
                    }
                    _ => None,
                }
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{}: {name} has no caption string",
                        captions_path.display()
                    ))
                })?;
                map.insert(name, caption);
            }
            Some(map)
        } else {
            None
        };
        Ok(Self {
            files,
            labels,
            captions,
        })
    }

    /// The caption of a file, when the folder has captions.
    pub fn caption(&self, path: &Path) -> Option<String> {
        self.captions.as_ref()?.get(&file_name(path)).cloned()
    }

    /// The files of one part of the split.
    pub fn part(&self, split: Split, eval_percent: u32) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|p| split_of(&file_name(p), eval_percent) == split)
            .cloned()
            .collect()
    }

    /// The class index of a file, when labelled.
    pub fn label(&self, path: &Path) -> Option<usize> {
        self.labels.as_ref()?.get(&file_name(path)).copied()
    }
}

/// A batch of crops with what is known about each.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, 3, crop, crop]` in `[0, 1]`.
    pub images: Tensor,
    /// Class label of each crop's image.
    pub labels: Vec<Option<usize>>,
    /// Caption of each crop's image.
    pub captions: Vec<Option<String>>,
}

/// Random `crop`x`crop` patches with random horizontal flips from a set of images, reproducible
/// from a seed. Images are decoded once and kept in memory.
#[derive(Debug)]
pub struct CropSampler {
    images: Vec<RgbImage>,
    labels: Vec<Option<usize>>,
    captions: Vec<Option<String>>,
    crop: u32,
    rng: SplitMix64,
}

impl CropSampler {
    /// Loads `files` (each at least `crop` pixels on both sides) and seeds the sampler.
    pub fn new(files: &[PathBuf], crop: u32, seed: u64) -> Result<Self> {
        if files.is_empty() || crop == 0 {
            return Err(Error::InvalidArgument(
                "no images or a zero crop size".into(),
            ));
        }
        let images = files
            .iter()
            .map(|p| {
                let img = load_image(p)?;
                if img.width() < crop || img.height() < crop {
                    return Err(Error::Image(format!(
                        "{}: {}x{} is smaller than the {crop}x{crop} crop",
                        p.display(),
                        img.width(),
                        img.height()
                    )));
                }
                Ok(img)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            labels: vec![None; images.len()],
            captions: vec![None; images.len()],
            images,
            crop,
            rng: SplitMix64::new(seed),
        })
    }

    /// Attaches a class label (or `None`) to each image, in the order of the files given to
    /// [`new`](Self::new).
    pub fn with_labels(mut self, labels: Vec<Option<usize>>) -> Result<Self> {
        if labels.len() != self.images.len() {
            return Err(Error::InvalidArgument(format!(
                "{} labels for {} images",
                labels.len(),
                self.images.len()
            )));
        }
        self.labels = labels;
        Ok(self)
    }

    /// Attaches a caption (or `None`) to each image, in the order of the files given to
    /// [`new`](Self::new).
    pub fn with_captions(mut self, captions: Vec<Option<String>>) -> Result<Self> {
        if captions.len() != self.images.len() {
            return Err(Error::InvalidArgument(format!(
                "{} captions for {} images",
                captions.len(),
                self.images.len()
            )));
        }
        self.captions = captions;
        Ok(self)
    }

    /// The generator's state, to checkpoint and resume sampling exactly.
    pub fn rng_state(&self) -> u64 {
        self.rng.state()
    }

    /// Restores a state from [`rng_state`](Self::rng_state).
    pub fn set_rng_state(&mut self, state: u64) {
        self.rng = SplitMix64::new(state);
    }

    /// The next batch `[batch, 3, crop, crop]` in `[0, 1]`.
    pub fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Tensor> {
        Ok(self.next_labelled_batch(batch, device)?.0)
    }

    /// The next batch and the label of each of its crops (the same draws as
    /// [`next_batch`](Self::next_batch)).
    pub fn next_labelled_batch(
        &mut self,
        batch: usize,
        device: &Device,
    ) -> Result<(Tensor, Vec<Option<usize>>)> {
        let b = self.next_annotated_batch(batch, device)?;
        Ok((b.images, b.labels))
    }

    /// The next batch with the label and the caption of each crop (the same draws as
    /// [`next_batch`](Self::next_batch)).
    pub fn next_annotated_batch(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        let mut labels = Vec::with_capacity(batch);
        let mut captions = Vec::with_capacity(batch);
        let c = self.crop as usize;
        let mut data = vec![0f32; batch * 3 * c * c];
        for b in 0..batch {
            let pick = (self.rng.next_u64() % self.images.len() as u64) as usize;
            labels.push(self.labels[pick]);
            captions.push(self.captions[pick].clone());
            let img = &self.images[pick];
            let x0 = (self.rng.next_u64() % (img.width() - self.crop + 1) as u64) as u32;
            let y0 = (self.rng.next_u64() % (img.height() - self.crop + 1) as u64) as u32;
            let flip = self.rng.next_u64() & 1 == 1;
            for y in 0..c {
                for x in 0..c {
                    let sx = if flip { c - 1 - x } else { x };
                    let px = img.get_pixel(x0 + sx as u32, y0 + y as u32);
                    for ch in 0..3 {
                        data[((b * 3 + ch) * c + y) * c + x] = px[ch] as f32 / 255.0;
                    }
                }
            }
        }
        Ok(Batch {
            images: Tensor::from_vec(data, (batch, 3, c, c), device)?,
            labels,
            captions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stable_and_near_the_requested_share() {
        let names: Vec<String> = (0..2000).map(|i| format!("img_{i:05}.jpg")).collect();
        let eval = names
            .iter()
            .filter(|n| split_of(n, 20) == Split::Eval)
            .count();
        assert!((300..=500).contains(&eval), "{eval} of 2000 in eval");
        // Known values: the split of a name never changes.
        assert_eq!(
            split_of("n01440764_tench.jpg", 20),
            split_of("n01440764_tench.jpg", 20)
        );
        assert!(names.iter().all(|n| split_of(n, 0) == Split::Train));
        assert!(names.iter().all(|n| split_of(n, 100) == Split::Eval));
    }

    #[test]
    fn sampler_is_reproducible_and_resumable() {
        let dir = std::env::temp_dir().join(format!("psic-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..3u8 {
            RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * i, y as u8, i * 50]))
                .save(dir.join(format!("{i}.png")))
                .unwrap();
        }
        let folder = ImageFolder::open(&dir).unwrap();
        assert_eq!(folder.files.len(), 3);
        let dev = Device::Cpu;
        let mut a = CropSampler::new(&folder.files, 16, 7).unwrap();
        let mut b = CropSampler::new(&folder.files, 16, 7).unwrap();
        let first = a.next_batch(4, &dev).unwrap();
        assert_eq!(first.dims(), &[4, 3, 16, 16]);
        b.next_batch(4, &dev).unwrap();
        let state = a.rng_state();
        let next_a = a.next_batch(4, &dev).unwrap();
        let mut c = CropSampler::new(&folder.files, 16, 99).unwrap();
        c.set_rng_state(state);
        let next_c = c.next_batch(4, &dev).unwrap();
        let next_b = b.next_batch(4, &dev).unwrap();
        let same = |x: &Tensor, y: &Tensor| {
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&next_a, &next_b) && same(&next_a, &next_c));
        assert!(!same(&first, &next_a));
        assert!(CropSampler::new(&folder.files, 64, 0).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
