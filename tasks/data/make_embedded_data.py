# Copyright 2024 The teacherlm-jax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Regenerates the small sample datasets embedded in the `tasks` package (`tasks/data/`).

    python tasks/data/make_embedded_data.py [--shared_dir DIR] [--out DIR]

Deterministic: fixed row ranges of the public files in `--shared_dir` (the TeacherLM authors' release of ECQA
`ecqa_test.jsonl` and CREAK `creak_dev.jsonl`), no randomness, stable JSON/CSV/TFRecord serialization, so running
it twice gives byte-identical files. MMLU and StrategyQA have no data in `--shared_dir`: their rows below are
hand-written format fixtures (original questions, not the real datasets). See README.md next to this script.

Row ranges are disjoint across outputs, so evaluation samples never overlap training samples:

  ECQA   0..199  teacherdata/train        200..239  teacherdata/validation
         300..599 ecqa/train              2000..2099 ecqa/test
         600..674 p3/ecqa_answer_the_question (train 600..659, validation 660..674)
         700..774 muffin/ecqa_flan_question_answering, 775..849 muffin/ecqa_flan_explanation
  CREAK  0..299  creak/train              1200..1299 creak/validation
         300..374, 375..449, 450..524  the three p3/creak_* prompts (60 train + 15 validation each)
         600..674 muffin/creak_flan_fact_verification
"""

import argparse
import csv
import hashlib
import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "datasets"

LETTERS = "ABCDE"
ECQA_OPTIONS = tuple(f"q_op{k}" for k in range(1, 6))
ECQA_FIELDS = ("q_no", "q_concept", "q_text") + ECQA_OPTIONS + ("q_ans", "taskA_pos", "taskA_neg", "taskB")
CREAK_FIELDS = ("ex_id", "sentence", "explanation", "label", "entity")
TFRECORD_SUFFIX = ".tfrecord-00000-of-00001"



# ---------------------------------------------------------------------------------------------------------------
# Writers (deterministic bytes).

def _json_line(obj) -> str:
  # Same style as the source files: default separators, UTF-8 characters kept as they are.
  return json.dumps(obj, ensure_ascii=False) + "\n"


def write_jsonl(path: pathlib.Path, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="\n") as handle:
    for row in rows:
      handle.write(_json_line(row))


def write_tfrecord(path: pathlib.Path, rows) -> None:
  """rows: dicts of str (-> bytes feature, UTF-8) or int (-> int64 feature); keys serialized sorted."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(path)) as writer:
    for row in rows:
      feature = {}
      for key, value in row.items():
        if isinstance(value, str):
          feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))
        elif isinstance(value, int):
          feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        else:
          raise TypeError(f"{key}: {type(value)}")
      example = tf.train.Example(features=tf.train.Features(feature=feature))
      writer.write(example.SerializeToString(deterministic=True))


def write_csv(path: pathlib.Path, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as handle:
    writer = csv.writer(handle, lineterminator="\n")  # QUOTE_MINIMAL: quotes fields with , " or newlines
    for row in rows:
      writer.writerow(row)


def read_jsonl(path: pathlib.Path):
  with open(path, encoding="utf-8") as handle:
    return [json.loads(line) for line in handle]


# ---------------------------------------------------------------------------------------------------------------
# ECQA-derived.

def ecqa_options(row):
  return [row[name] for name in ECQA_OPTIONS]


def ecqa_answer_matches(row):
  return [k for k, option in enumerate(ecqa_options(row)) if option == row["q_ans"]]


def teacherdata_record(row):
  matches = ecqa_answer_matches(row)
  assert matches, (row["q_no"], "q_ans is none of the options")
  letter = LETTERS[matches[-1]]  # a repeated option: the release's answer letter is the last match
  question = row["q_text"] + "".join(f" ({LETTERS[k]}) {op}" for k, op in enumerate(ecqa_options(row)))
  # Sanity checks against the fields the release already rendered.
  assert "Q: " + question + " A: The answer is (" == row["test"], row["q_no"]
  assert "Q: " + question == row["question"], row["q_no"]
  assert f"({letter})" == row["answer"], (row["q_no"], letter, row["answer"])
  return {
      "id": "ecqa-" + row["q_no"],
      "task": "ecqa",
      "question": question,
      "answer": f"({letter})",
      "fundamentals": row["taskA_pos"],
      "chain_of_thought": row["taskB"],
      "common_mistakes": row["taskA_neg"],
  }


def teacherdata_rows(ecqa, start, stop):
  return [teacherdata_record(ecqa[i]) for i in range(start, stop)]


def ecqa_original(row):
  return {name: row[name] for name in ECQA_FIELDS}


def options_block(options, header="Options:"):
  return header + "\n" + "\n".join(f"- {op}" for op in options)


def p3_ecqa_answer_the_question(row):
  return {"inputs": row["q_text"] + "\n" + options_block(ecqa_options(row)), "targets": row["q_ans"]}


def muffin_ecqa_question_answering(row):
  return {
      "inputs": ("Answer the following question by picking the best option.\n\n"
                 f"Question: {row['q_text']}\n\n" + options_block(ecqa_options(row), "OPTIONS:")),
      "targets": row["q_ans"],
  }


def muffin_ecqa_explanation(row):
  return {
      "inputs": (row["q_text"] + "\n" + options_block(ecqa_options(row)) +
                 "\nPick the best option and explain your reasoning step by step."),
      "targets": f"{row['taskB'].strip()} So the answer is {row['q_ans']}.",
  }


# ---------------------------------------------------------------------------------------------------------------
# CREAK-derived.

def creak_original(row):
  assert row["label"] in ("true", "false"), row["ex_id"]
  return {name: row[name] for name in CREAK_FIELDS}


def p3_creak_claim_true_or_false(row):
  return {"inputs_pretokenized": f"Is the following claim true or false? {row['sentence']}",
          "targets_pretokenized": row["label"]}


def p3_creak_explain_claim(row):
  return {"inputs_pretokenized": f"Explain why this claim is {row['label']}: {row['sentence']}",
          "targets_pretokenized": row["explanation"]}


def p3_creak_entity_of_claim(row):
  return {"inputs_pretokenized": f"Which entity is this claim about? {row['sentence']}",
          "targets_pretokenized": row["entity"]}


def muffin_creak_fact_verification(row):
  return {
      "inputs": f"Is the following sentence factually correct?\n\"{row['sentence']}\"\nOPTIONS:\n- yes\n- no",
      "targets": {"true": "yes", "false": "no"}[row["label"]],
  }


# ---------------------------------------------------------------------------------------------------------------
# MMLU format fixture: original questions written for this repository (NOT from MMLU). Columns: question, A, B, C,
# D, answer. Some rows deliberately exercise the rendering rules (a newline inside a question, questions without
# final punctuation) and CSV quoting (fields with a comma and a double quote).

MMLU = {
    "high_school_geography": {
        "dev": [
            ("Which line of latitude divides the Earth into the Northern and Southern Hemispheres?",
             "The Prime Meridian", "The Equator", "The Tropic of Cancer", "The Arctic Circle", "B"),
            ("What is the longest river in South America?", "Orinoco", "Parana", "Amazon", "Magdalena", "C"),
            ("A map that uses colors or shading to show how a statistic such as population density varies from "
             "region to region is called a", "topographic map", "choropleth map", "nautical chart",
             "cadastral map", "B"),
            ("Which of these countries is landlocked?", "Bolivia", "Peru", "Chile", "Colombia", "A"),
            ("The movement of people from rural areas into cities is known as", "urbanization",
             "desertification", "gentrification", "deforestation", "A"),
        ],
        "val": [
            ("Which ocean lies between Africa and Australia?", "Atlantic Ocean", "Arctic Ocean", "Indian Ocean",
             "Southern Ocean", "C"),
            ("Mount Everest is part of which mountain range?", "Andes", "Alps", "Rocky Mountains", "Himalayas",
             "D"),
            ("What is the capital city of Canada?", "Toronto", "Ottawa", "Vancouver", "Montreal", "B"),
        ],
        "test": [
            ("Read the statement below.\nA delta is a landform built from sediment that a river deposits.\n"
             "Where does a delta usually form?", "At the source of a river", "At the mouth of a river",
             "On a mountain summit", "In the middle of a desert", "B"),
            ("Which is the largest hot desert in the world?", "Gobi", "Kalahari", "Sahara", "Atacama", "C"),
            ("Which country has the largest population in Africa?", "Egypt", "Ethiopia", "South Africa",
             "Nigeria", "D"),
            ("Lines of longitude (meridians) run between which two points?", "The North Pole and the South Pole",
             "The east and west coasts of a continent", "The Equator and the Tropic of Capricorn",
             "The Arctic Circle and the Antarctic Circle", "A"),
            ("Which strait separates Europe from Africa at the western end of the Mediterranean Sea?",
             "Bering Strait", "Strait of Gibraltar", "Strait of Hormuz", "Strait of Malacca", "B"),
            ('Which measure, usually shortened to "GDP", is the total value of goods and services produced in a '
             "country in a year?", "Gross domestic product", "Gross development percentage",
             "General demographic profile", "Government debt payment", "A"),
        ],
    },
    "college_biology": {
        "dev": [
            ("Which organelle is the main site of ATP production in eukaryotic cells?", "Ribosome",
             "Mitochondrion", "Golgi apparatus", "Lysosome", "B"),
            ("During which phase of mitosis do sister chromatids separate and move toward opposite poles?",
             "Prophase", "Metaphase", "Anaphase", "Telophase", "C"),
            ("Which base is found in RNA but not in DNA?", "Adenine", "Thymine", "Guanine", "Uracil", "D"),
            ("In a cross between two heterozygous pea plants (Aa x Aa), what fraction of the offspring is "
             "expected to be homozygous recessive (aa)?", "1/4", "1/2", "3/4", "0", "A"),
            ("Enzymes speed up chemical reactions by", "raising the activation energy",
             "lowering the activation energy", "changing the equilibrium constant",
             "being used up in the reaction", "B"),
        ],
        "val": [
            ("Which molecule carries amino acids to the ribosome during translation?", "mRNA", "tRNA", "rRNA",
             "DNA polymerase", "B"),
            ("In plant cells, photosynthesis takes place mainly in which organelle?", "Chloroplast", "Nucleus",
             "Central vacuole", "Peroxisome", "A"),
            ("Which bonds hold the two strands of a DNA double helix together?", "Ionic bonds", "Peptide bonds",
             "Hydrogen bonds between base pairs", "Disulfide bonds", "C"),
        ],
        "test": [
            ("Which process produces four genetically distinct haploid cells from one diploid cell?", "Mitosis",
             "Meiosis", "Binary fission", "Budding", "B"),
            ("The net movement of water across a selectively permeable membrane toward the side with the higher "
             "solute concentration is called", "osmosis", "active transport", "endocytosis", "exocytosis", "A"),
            ("Which blood cells are primarily responsible for carrying oxygen?", "Neutrophils", "Platelets",
             "Lymphocytes", "Erythrocytes", "D"),
            ("A point mutation that changes a codon for an amino acid into a stop codon is called a",
             "missense mutation", "nonsense mutation", "silent mutation", "frameshift mutation", "B"),
            ("Consider the following pathway.\nGlucose is broken down into two molecules of pyruvate in the "
             "cytoplasm.\nWhat is this process called?", "Glycolysis", "The Krebs cycle", "The Calvin cycle",
             "Oxidative phosphorylation", "A"),
            ("To which domain of life does the bacterium Escherichia coli belong?", "Archaea", "Eukarya",
             "Bacteria", "Protista", "C"),
        ],
    },
    "world_religions": {
        "dev": [
            ("What is the holy book of Islam?", "The Torah", "The Qur'an", "The Vedas", "The Tripitaka", "B"),
            ("In which city is the Kaaba located?", "Medina", "Jerusalem", "Mecca", "Cairo", "C"),
            ("Siddhartha Gautama is better known by which title?", "The Buddha", "The Guru", "The Prophet",
             "The Messiah", "A"),
            ('Which festival, often called the "festival of lights", is celebrated by Hindus, Sikhs and Jains?',
             "Holi", "Diwali", "Navratri", "Vaisakhi", "B"),
            ("The Five Pillars are the core practices of which religion", "Judaism", "Sikhism", "Islam",
             "Shinto", "C"),
        ],
        "val": [
            ("What is the Hebrew name of the Jewish weekly day of rest?", "Shabbat", "Ramadan", "Lent", "Vesak",
             "A"),
            ("Which religion was founded by Guru Nanak?", "Jainism", "Sikhism", "Zoroastrianism", "Taoism", "B"),
            ("The Tao Te Ching is a central text of which tradition?", "Confucianism", "Shinto", "Taoism",
             "Hinduism", "C"),
        ],
        "test": [
            ("The Four Noble Truths are a central teaching of which religion?", "Buddhism", "Christianity",
             "Judaism", "Jainism", "A"),
            ("Which Christian holiday celebrates the resurrection of Jesus?", "Christmas", "Pentecost", "Easter",
             "Epiphany", "C"),
            ("Shinto is the indigenous religion of which country?", "China", "Korea", "Japan", "Vietnam", "C"),
            ("Read the description.\nIts followers revere the Vedas, and many worship deities such as Vishnu and "
             "Shiva.\nWhich religion is being described?", "Hinduism", "Islam", "Sikhism", "Baha'i Faith", "A"),
            ("In Judaism, the festival of Passover commemorates", "the giving of the Torah at Mount Sinai",
             "the Exodus of the Israelites from Egypt", "the rededication of the Second Temple",
             "the creation of the world", "B"),
            ("In which language was most of the Hebrew Bible originally written?", "Greek", "Latin", "Hebrew",
             "Sanskrit", "C"),
        ],
    },
}

# ---------------------------------------------------------------------------------------------------------------
# StrategyQA format fixture: original yes/no multi-hop questions written for this repository (NOT from
# StrategyQA). Fields: term, description, question, answer, facts, decomposition; `qid` is derived below.

STRATEGYQA = {
    "train": [
        ("Giraffe", "Tall African hoofed mammal",
         "Could an adult giraffe stand upright in a room with a 2.5 meter ceiling?", False,
         ["Adult giraffes are usually between 4.3 and 5.7 meters tall.",
          "A room with a 2.5 meter ceiling has 2.5 meters of headroom."],
         ["How tall is an adult giraffe?", "How much headroom does a room with a 2.5 meter ceiling have?",
          "Is #1 less than #2?"]),
        ("Penguin", "Flightless seabird of the Southern Hemisphere",
         "Do wild penguins live at the North Pole?", False,
         ["Wild penguins live almost entirely in the Southern Hemisphere.",
          "The North Pole is in the Arctic, at the northern end of the Northern Hemisphere."],
         ["Where do wild penguins live?", "In which hemisphere is the North Pole?", "Is #2 part of #1?"]),
        ("Leonardo da Vinci", "Italian Renaissance painter and inventor",
         "Could Leonardo da Vinci have watched a film in a cinema?", False,
         ["Leonardo da Vinci died in 1519.", "The first public film screenings took place in the 1890s."],
         ["When did Leonardo da Vinci die?", "When were films first shown to the public?", "Is #2 before #1?"]),
        ("Honey", "Sweet food made by bees from flower nectar",
         "Is honey part of a vegan diet?", False,
         ["Honey is made by honey bees.", "Bees are animals.",
          "A vegan diet excludes food made by animals."],
         ["Which creatures make honey?", "Are #1 animals?", "Does a vegan diet include food made by #1?"]),
        ("Mount Everest", "Highest mountain on Earth above sea level",
         "Is the summit of Mount Everest higher than the cruising altitude of a typical passenger jet?", False,
         ["The summit of Mount Everest is about 8,849 meters above sea level.",
          "Passenger jets usually cruise at about 10,000 to 12,000 meters."],
         ["How high is the summit of Mount Everest?", "At what altitude do passenger jets usually cruise?",
          "Is #1 greater than #2?"]),
        ("Water", "Chemical compound made of hydrogen and oxygen",
         "Would a glass of water left outside overnight at minus 20 degrees Celsius freeze?", True,
         ["Water freezes at 0 degrees Celsius at normal pressure.",
          "Minus 20 degrees Celsius is colder than 0 degrees Celsius."],
         ["At what temperature does water freeze?", "Is minus 20 degrees Celsius below #1?"]),
        ("Saturn", "Sixth planet from the Sun",
         "Could Earth fit inside Saturn?", True,
         ["Saturn is about 116,000 kilometers in diameter.", "Earth is about 12,700 kilometers in diameter."],
         ["What is the diameter of Saturn?", "What is the diameter of Earth?", "Is #1 larger than #2?"]),
        ("William Shakespeare", "English playwright and poet",
         "Were some of Shakespeare's plays first performed while Elizabeth I was queen?", True,
         ["Shakespeare's plays were written between about 1590 and 1613.",
          "Elizabeth I reigned over England from 1558 to 1603."],
         ["When were Shakespeare's plays written?", "When did Elizabeth I reign?", "Do #1 and #2 overlap?"]),
        ("Summer Olympic Games", "International multi-sport event",
         "Could a person attend the Summer Olympics in two consecutive calendar years?", False,
         ["The Summer Olympics are held once every four years.",
          "The 2020 Games were postponed to 2021, and the next Games took place in 2024."],
         ["How often are the Summer Olympics held?", "Is #1 once a year or more often?"]),
        ("Giant panda", "Bear native to the mountains of central China",
         "Is the main food of giant pandas a kind of grass?", True,
         ["Bamboo makes up almost all of a giant panda's diet.",
          "Bamboo belongs to the grass family, Poaceae."],
         ["What is the main food of giant pandas?", "Is #1 a kind of grass?"]),
        ("February 29", "Leap day of the Gregorian calendar",
         "Does a person born on February 29 have fewer birthdays on their exact birth date than years of age?",
         True,
         ["February 29 exists only in leap years.", "Leap years usually happen once every four years."],
         ["In which years does February 29 occur?", "Does #1 happen less often than every year?"]),
        ("Sahara", "Large desert in North Africa",
         "Could someone walk from the Sahara to Australia without crossing the sea?", False,
         ["The Sahara is in Africa.", "Australia is an island continent surrounded by ocean."],
         ["On which continent is the Sahara?", "Is #1 connected to Australia by land?"]),
        ("Guitar", "Fretted string instrument",
         "Does a standard guitar have more strings than a violin?", True,
         ["A standard guitar has six strings.", "A violin has four strings."],
         ["How many strings does a standard guitar have?", "How many strings does a violin have?",
          "Is #1 greater than #2?"]),
        ("Spider", "Eight-legged arthropod that spins silk",
         "Are spiders in the same class of animals as insects?", False,
         ["Spiders belong to the class Arachnida.", "Insects belong to the class Insecta."],
         ["Which class do spiders belong to?", "Which class do insects belong to?", "Is #1 the same as #2?"]),
        ("Apollo 11", "First crewed mission to land on the Moon",
         "Did people walk on the Moon before the World Wide Web was invented?", True,
         ["People first walked on the Moon in 1969 during Apollo 11.",
          "Tim Berners-Lee invented the World Wide Web in 1989."],
         ["When did people first walk on the Moon?", "When was the World Wide Web invented?",
          "Is #1 before #2?"]),
        ("Great Wall of China", "Series of ancient fortifications across northern China",
         "Is the Great Wall of China in the Northern Hemisphere?", True,
         ["The Great Wall of China runs across northern China.", "All of China lies north of the Equator."],
         ["Where is the Great Wall of China?", "Is #1 north of the Equator?"]),
        ("Blue whale", "Largest animal known to have lived",
         "Does a blue whale have to come to the surface to breathe?", True,
         ["Blue whales are mammals.", "Mammals breathe air with lungs and cannot breathe underwater."],
         ["What kind of animal is a blue whale?", "Do #1 have to breathe air?"]),
        ("Iron", "Metallic chemical element with symbol Fe",
         "Would a solid iron bar float in a bucket of water?", False,
         ["Iron has a density of about 7.9 grams per cubic centimeter.",
          "Water has a density of about 1 gram per cubic centimeter.",
          "A solid object denser than water sinks in it."],
         ["What is the density of iron?", "What is the density of water?", "Is #1 less than #2?"]),
        ("Tomato", "Edible plant of the nightshade family",
         "Is a tomato a fruit in the botanical sense?", True,
         ["Botanically, a fruit is the seed-bearing structure that develops from the ovary of a flower.",
          "A tomato develops from the ovary of the tomato flower and contains the seeds."],
         ["What is a fruit in the botanical sense?", "Does a tomato fit #1?"]),
        ("Polar bear", "Large bear of the Arctic",
         "Do polar bears live in the wild in Antarctica?", False,
         ["Wild polar bears live only in the Arctic.",
          "Antarctica is at the opposite end of the Earth from the Arctic."],
         ["Where do wild polar bears live?", "Is Antarctica part of #1?"]),
    ],
    "validation": [
        ("Mercury (planet)", "Smallest planet in the Solar System",
         "Is Mercury closer to the Sun than Earth is?", True,
         ["Mercury is the closest planet to the Sun.", "Earth is the third planet from the Sun."],
         ["What is the position of Mercury among the planets counted from the Sun?",
          "What is the position of Earth among the planets counted from the Sun?", "Is #1 smaller than #2?"]),
        ("Ostrich", "Large flightless bird of Africa",
         "Could an ostrich fly across the English Channel?", False,
         ["Ostriches are flightless birds.", "The English Channel is a stretch of sea between England and France."],
         ["Can ostriches fly?", "Would crossing the English Channel through the air require flying?",
          "Are #1 and #2 both true?"]),
        ("Chess", "Two-player strategy board game",
         "Does a chessboard have more squares than a year has weeks?", True,
         ["A chessboard has 64 squares.", "A year has about 52 weeks."],
         ["How many squares does a chessboard have?", "How many weeks does a year have?",
          "Is #1 greater than #2?"]),
        ("Charles Darwin", "English naturalist known for the theory of evolution",
         "Did Charles Darwin ever travel in an airplane?", False,
         ["Charles Darwin died in 1882.", "The first powered airplane flight was made in 1903."],
         ["When did Charles Darwin die?", "When was the first powered airplane flight?", "Is #2 before #1?"]),
        ("Coffee", "Drink brewed from roasted coffee beans",
         "Does a typical cup of coffee contain a stimulant?", True,
         ["Coffee naturally contains caffeine.", "Caffeine is a stimulant of the central nervous system."],
         ["Which drug does coffee naturally contain?", "Is #1 a stimulant?"]),
        ("Nile", "Major river of northeastern Africa",
         "Does the Nile flow into the Atlantic Ocean?", False,
         ["The Nile flows north through Egypt.", "The Nile empties into the Mediterranean Sea."],
         ["Into which body of water does the Nile flow?", "Is #1 the Atlantic Ocean?"]),
        ("Octopus", "Eight-armed marine mollusc",
         "Does an octopus have more arms than most starfish?", True,
         ["An octopus has eight arms.", "Most starfish have five arms."],
         ["How many arms does an octopus have?", "How many arms do most starfish have?",
          "Is #1 greater than #2?"]),
        ("Diamond", "Crystalline form of carbon",
         "Can a steel knife scratch a diamond?", False,
         ["Diamond is rated 10 on the Mohs hardness scale, the highest value.",
          "Steel is rated about 4 to 6.5 on the Mohs hardness scale.",
          "A material cannot scratch another material that is harder than itself."],
         ["How hard is diamond on the Mohs scale?", "How hard is steel on the Mohs scale?",
          "Is #2 at least as high as #1?"]),
        ("Ice", "Water frozen into a solid",
         "Would an ice cube float in a glass of liquid water?", True,
         ["Ice is less dense than liquid water.", "An object less dense than water floats in it."],
         ["Is ice less dense than liquid water?", "Does an object that is #1 float in water?"]),
        ("Albert Einstein", "Physicist who developed the theory of relativity",
         "Could Albert Einstein have used a smartphone?", False,
         ["Albert Einstein died in 1955.", "The first smartphones appeared in the 1990s."],
         ["When did Albert Einstein die?", "When did the first smartphones appear?", "Is #2 before #1?"]),
    ],
}


def strategyqa_record(item):
  term, description, question, answer, facts, decomposition = item
  return {
      "qid": hashlib.sha1(question.encode("utf-8")).hexdigest()[:20],
      "term": term,
      "description": description,
      "question": question,
      "answer": answer,
      "facts": facts,
      "decomposition": decomposition,
  }


# ---------------------------------------------------------------------------------------------------------------

def split_rows(rows, start, n_train, n_validation, make):
  chosen = rows[start:start + n_train + n_validation]
  assert len(chosen) == n_train + n_validation
  return [make(r) for r in chosen[:n_train]], [make(r) for r in chosen[n_train:]]


def generate(shared_dir: pathlib.Path, out: pathlib.Path) -> list:
  ecqa = read_jsonl(shared_dir / "ecqa_test.jsonl")
  creak = read_jsonl(shared_dir / "creak_dev.jsonl")
  assert len(ecqa) == 2194 and len(creak) == 1371, (len(ecqa), len(creak))
  written = []

  def jsonl(rel, rows):
    write_jsonl(out / rel, rows)
    written.append(rel)

  def tfrecord(rel, rows):
    write_tfrecord(out / rel, rows)
    written.append(rel)

  # 1. TeacherData (ECQA-derived).
  jsonl("teacherdata/train.jsonl", teacherdata_rows(ecqa, 0, 200))
  jsonl("teacherdata/validation.jsonl", teacherdata_rows(ecqa, 200, 240))

  # 2. ECQA, original fields.
  jsonl("ecqa/train.jsonl", [ecqa_original(r) for r in ecqa[300:600]])
  jsonl("ecqa/test.jsonl", [ecqa_original(r) for r in ecqa[2000:2100]])

  # 3. CREAK, original fields.
  jsonl("creak/train.jsonl", [creak_original(r) for r in creak[0:300]])
  jsonl("creak/validation.jsonl", [creak_original(r) for r in creak[1200:1300]])

  # 4. P3: three CREAK prompts as TFRecord (P3's layout), one ECQA prompt as JSONL.
  for start, prompt, make in ((300, "creak_claim_true_or_false", p3_creak_claim_true_or_false),
                              (375, "creak_explain_claim", p3_creak_explain_claim),
                              (450, "creak_entity_of_claim", p3_creak_entity_of_claim)):
    train, validation = split_rows(creak, start, 60, 15, make)
    for split, rows in (("train", train), ("validation", validation)):
      tfrecord(f"p3/{prompt}/{split}{TFRECORD_SUFFIX}",
               [dict(row, idx=i) for i, row in enumerate(rows)])
  train, validation = split_rows(ecqa, 600, 60, 15, p3_ecqa_answer_the_question)
  jsonl("p3/ecqa_answer_the_question/train.jsonl", train)
  jsonl("p3/ecqa_answer_the_question/validation.jsonl", validation)

  # 5. Muffin (Flan 2021): two ECQA tasks as JSONL, one CREAK task as TFRecord.
  for start, task, make in ((700, "ecqa_flan_question_answering", muffin_ecqa_question_answering),
                            (775, "ecqa_flan_explanation", muffin_ecqa_explanation)):
    train, validation = split_rows(ecqa, start, 60, 15, make)
    jsonl(f"muffin/{task}/train.jsonl", train)
    jsonl(f"muffin/{task}/validation.jsonl", validation)
  train, validation = split_rows(creak, 600, 60, 15, muffin_creak_fact_verification)
  tfrecord(f"muffin/creak_flan_fact_verification/train{TFRECORD_SUFFIX}", train)
  tfrecord(f"muffin/creak_flan_fact_verification/validation{TFRECORD_SUFFIX}", validation)

  # 6. MMLU (hand-written format fixture, Hendrycks CSV layout).
  for subject, splits in MMLU.items():
    for split, rows in splits.items():
      for row in rows:
        assert len(row) == 6 and row[5] in "ABCD" and all(isinstance(x, str) and x for x in row), row
      rel = f"mmlu/{split}/{subject}_{split}.csv"
      write_csv(out / rel, rows)
      written.append(rel)

  # 7. StrategyQA (hand-written format fixture).
  for split, items in STRATEGYQA.items():
    rows = [strategyqa_record(item) for item in items]
    assert sum(r["answer"] for r in rows) * 2 == len(rows), f"{split}: unbalanced answers"
    jsonl(f"strategyqa/{split}.jsonl", rows)
  return written


# ---------------------------------------------------------------------------------------------------------------
# Validation of what was written.

EXPECTED_KEYS = {
    "teacherdata": ("id", "task", "question", "answer", "fundamentals", "chain_of_thought", "common_mistakes"),
    "ecqa": ECQA_FIELDS,
    "creak": CREAK_FIELDS,
    "p3": ("inputs", "targets"),
    "muffin": ("inputs", "targets"),
    "strategyqa": ("qid", "term", "description", "question", "answer", "facts", "decomposition"),
}
EXPECTED_TF_FEATURES = {
    "p3": {"inputs_pretokenized": "bytes", "targets_pretokenized": "bytes", "idx": "int64"},
    "muffin": {"inputs": "bytes", "targets": "bytes"},
}


def _check_value(rel, key, value):
  if key == "answer" and rel.startswith("strategyqa/"):
    assert isinstance(value, bool), (rel, key, value)
  elif key in ("facts", "decomposition"):
    assert isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value), (rel, key)
  else:
    assert isinstance(value, str) and value.strip(), (rel, key, value)


def validate(out: pathlib.Path, written) -> dict:
  """Re-reads every written file; returns {relative path: record count}."""
  counts = {}
  for rel in written:
    path = out / rel
    corpus = rel.split("/")[0]
    if rel.endswith(".jsonl"):
      rows = read_jsonl(path)
      for row in rows:
        assert tuple(row) == EXPECTED_KEYS[corpus], (rel, tuple(row))
        for key, value in row.items():
          _check_value(rel, key, value)
    elif rel.endswith(".csv"):
      with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
      assert all(len(r) == 6 and r[5] in ("A", "B", "C", "D") and all(x.strip() for x in r) for r in rows), rel
    else:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      spec = {k: tf.io.FixedLenFeature([], tf.string if t == "bytes" else tf.int64)
              for k, t in EXPECTED_TF_FEATURES[corpus].items()}
      rows = []
      for record in tf.data.TFRecordDataset(str(path)):
        example = tf.train.Example.FromString(record.numpy())
        assert set(example.features.feature) == set(spec), (rel, set(example.features.feature))
        parsed = tf.io.parse_single_example(record, spec)
        for key, kind in EXPECTED_TF_FEATURES[corpus].items():
          if kind == "bytes":
            assert parsed[key].numpy().decode("utf-8").strip(), (rel, key)
        if "idx" in parsed:
          assert int(parsed["idx"]) == len(rows), (rel, int(parsed["idx"]))
        rows.append(parsed)
    counts[rel] = len(rows)
  return counts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shared_dir", default=str(DEFAULT_SHARED),
                      help="folder with ecqa_test.jsonl and creak_dev.jsonl (default: %(default)s)")
  parser.add_argument("--out", default=str(HERE), help="output folder (default: %(default)s)")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  out = pathlib.Path(args.out)
  written = generate(pathlib.Path(args.shared_dir), out)
  counts = validate(out, written)
  total = 0
  for rel in written:
    size = (out / rel).stat().st_size
    total += size
    print(f"{rel:70s} {counts[rel]:5d} records {size:8d} bytes")
  print(f"{len(written)} files, {total} bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
