"""Write `sources/arithmetic_transfer.jsonl`: hand-written arithmetic questions for a transfer check, never for training.

The verifiable task generator scores its own held-out split well partly because test and train share its templates. These
questions were written by hand in other styles (word problems, money, time, ages, "twice as many", two steps, other
number ranges and wordings), so accuracy on them says whether a stage taught arithmetic or the generator's phrasing.
Each question sits next to the expression that answers it, and the answer written to the file is computed from that
expression here: a typo in an answer cannot slip in. Rows have the `test` split's columns (`prompt`, `answer`,
`domain`, `thinking`), so evaluation scores them (a single data file is the split `train`); recipes
list the file in `build_sft_set`'s `decontaminate` so no training row repeats one.

    python -m data_prep.write_arithmetic_transfer
"""

import re
from fractions import Fraction
from pathlib import Path

from posttrain.io import write_jsonl

OUTPUT = Path(__file__).parent / "sources" / "arithmetic_transfer.jsonl"

QUESTIONS = [
    ("Compute the value of 23 + 48.", "23 + 48"),
    ("Calculate the difference 91 - 37.", "91 - 37"),
    ("How much is 6 times 7?", "6 * 7"),
    ("What's 15 plus 27?", "15 + 27"),
    ("Find 72 divided by 8.", "72 / 8"),
    ("Please add 134 and 58.", "134 + 58"),
    ("Take 19 from 50. What remains?", "50 - 19"),
    ("What number do you get by multiplying 9 and 8?", "9 * 8"),
    ("Tell me the result of 305 - 120.", "305 - 120"),
    ("How much is 45 + 45?", "45 + 45"),
    ("What is 12 squared?", "12 * 12"),
    ("What is double 36?", "2 * 36"),
    ("What is half of 84?", "84 / 2"),
    ("What is 7 more than 58?", "58 + 7"),
    ("What does 250 + 375 equal?", "250 + 375"),
    ("Subtracting 1 from 1000 gives what number?", "1000 - 1"),
    ("Add up 3, 5 and 9.", "3 + 5 + 9"),
    ("What is the sum of 11, 22 and 33?", "11 + 22 + 33"),
    ("Please multiply 25 by 4.", "25 * 4"),
    ("Work out 64 ÷ 4.", "64 / 4"),
    ("Which number is 3 less than 40?", "40 - 3"),
    ("If you triple 13, what do you get?", "3 * 13"),
    ("17 multiplied by 3 is what?", "17 * 3"),
    ("Solve 8 x 6.", "8 * 6"),
    ("What is 2 + 3 * 4?", "2 + 3 * 4"),
    ("What is (10 - 4) * 5?", "(10 - 4) * 5"),
    ("Compute 100 - 45 - 25.", "100 - 45 - 25"),
    ("What is 9 + 9 + 9 + 9?", "9 + 9 + 9 + 9"),
    ("Give the answer to 56 / 7.", "56 / 7"),
    ("Add 1,200 to 300. What is the result?", "1200 + 300"),
    ("I have 14 pencils and my friend gives me 9 more. How many pencils do I have?", "14 + 9"),
    ("A farmer has 26 cows and buys 15 more. How many cows does the farmer have now?", "26 + 15"),
    ("There are 31 students in one class and 28 in another. How many students are in both classes together?",
     "31 + 28"),
    ("Lily picked 18 strawberries and her brother picked 24. How many strawberries did they pick altogether?",
     "18 + 24"),
    ("A bus had 40 passengers. At the stop, 13 got off. How many passengers are still on the bus?", "40 - 13"),
    ("Sam baked 36 muffins and sold 29. How many muffins does he have left?", "36 - 29"),
    ("A library had 500 books and lent out 175. How many books are still in the library?", "500 - 175"),
    ("Mia has 52 stickers. She puts 12 in her album. How many stickers are not in the album?", "52 - 12"),
    ("A pack contains 6 juice boxes. How many juice boxes are in 7 packs?", "6 * 7"),
    ("A spider has 8 legs. How many legs do 5 spiders have?", "8 * 5"),
    ("Each car has 4 wheels. How many wheels do 12 cars have?", "4 * 12"),
    ("A classroom has 6 tables and 5 chairs at each table. How many chairs are there?", "6 * 5"),
    ("48 cookies are shared equally by 6 children. How many cookies does each child get?", "48 / 6"),
    ("A teacher splits 30 students into teams of 5. How many teams are there?", "30 / 5"),
    ("A ribbon 63 centimeters long is cut into 9 equal pieces. How long is each piece in centimeters?", "63 / 9"),
    ("Ninety-six eggs are put into cartons of 12. How many cartons are filled?", "96 / 12"),
    ("Jack has 7 marbles. Jill has twice as many marbles as Jack. How many marbles does Jill have?", "2 * 7"),
    ("A red box weighs 15 kg and a blue box weighs three times as much. How much does the blue box weigh, in kg?",
     "3 * 15"),
    ("Ella ran 4 laps and Max ran twice as many laps. How many laps did Max run?", "2 * 4"),
    ("A tree is 9 meters tall. A tower is 5 times as tall. How tall is the tower in meters?", "5 * 9"),
    ("Ravi has 20 cards, which is twice as many as Leo has. How many cards does Leo have?", "20 / 2"),
    ("A shirt costs $18 and a hat costs $7. How much do both cost together?", "18 + 7"),
    ("You have $50 and spend $23 on lunch. How much money do you have left?", "50 - 23"),
    ("Apples cost 3 dollars per kilogram. How much do 6 kilograms cost, in dollars?", "3 * 6"),
    ("A toy costs $12. How much do 4 toys cost?", "12 * 4"),
    ("Nina paid $20 for a book that cost $13. How much change did she get?", "20 - 13"),
    ("Four friends share a $36 pizza bill equally. How much does each friend pay?", "36 / 4"),
    ("A notebook costs $2 and a pen costs $1. What do 3 notebooks and 2 pens cost in total?", "3 * 2 + 2 * 1"),
    ("Tickets are $8 each. How much do 5 tickets cost?", "8 * 5"),
    ("I had 75 cents and found a quarter (25 cents). How many cents do I have now?", "75 + 25"),
    ("Milk costs $3 a bottle. Omar buys 4 bottles and pays with a $20 bill. How much change does he get?",
     "20 - 3 * 4"),
    ("A sandwich costs $6 and a drink costs $2. What does lunch cost for 3 people who each buy both?", "3 * (6 + 2)"),
    ("Ben saves $5 every week. How much has he saved after 9 weeks?", "5 * 9"),
    ("A movie lasts 95 minutes and a short film before it lasts 15 minutes. How many minutes is that in total?",
     "95 + 15"),
    ("Homework takes 40 minutes. Ana has done 25 minutes. How many minutes are left?", "40 - 25"),
    ("How many minutes are there in 3 hours?", "3 * 60"),
    ("How many hours are there in 2 days?", "2 * 24"),
    ("A train leaves at 2 pm and arrives at 7 pm. How many hours is the trip?", "7 - 2"),
    ("Lucy practices piano for 20 minutes a day. How many minutes does she practice in a week?", "20 * 7"),
    ("How many seconds are there in 4 minutes?", "4 * 60"),
    ("A race started at 9:00 and the winner finished at 9:47. How many minutes did the winner take?", "47"),
    ("A holiday lasts 6 weeks. How many days long is it?", "6 * 7"),
    ("Tom is 12 years old. His sister is 5 years younger. How old is his sister?", "12 - 5"),
    ("Grandma is 70 and Dad is 42. How much older is Grandma than Dad?", "70 - 42"),
    ("Zara is 8. In 15 years, how old will she be?", "8 + 15"),
    ("Ken's mother is three times as old as Ken, who is 11. How old is his mother?", "3 * 11"),
    ("Five years ago Pia was 9. How old is she now?", "9 + 5"),
    ("The sum of the ages of two twins is 26. How old is each twin?", "26 / 2"),
    ("Rosa had 10 balloons, got 6 more, then 4 popped. How many balloons does she have?", "10 + 6 - 4"),
    ("A shop had 120 apples. It sold 45 in the morning and 30 in the afternoon. How many apples are left?",
     "120 - 45 - 30"),
    ("Kim buys 3 bags of oranges with 8 oranges in each bag and eats 5. How many oranges remain?", "3 * 8 - 5"),
    ("There are 4 boxes with 6 pens each, plus 3 loose pens. How many pens are there in all?", "4 * 6 + 3"),
    ("A gardener plants 5 rows of 7 tulips and then 10 more tulips. How many tulips did she plant?", "5 * 7 + 10"),
    ("Leo reads 12 pages a day for 5 days and then 8 pages on the sixth day. How many pages did he read?",
     "12 * 5 + 8"),
    ("Sara had 60 dollars. She bought 2 books at 15 dollars each. How much money does she have left?",
     "60 - 2 * 15"),
    ("A baker makes 3 trays of 12 rolls and sells 20. How many rolls are left?", "3 * 12 - 20"),
    ("Three friends each have 9 candies. They eat 7 candies in total. How many candies are left?", "3 * 9 - 7"),
    ("Paul scored 14 points in the first game and 3 more points in the second game. How many points in both games?",
     "14 + (14 + 3)"),
    ("Ana has 6 red beads and twice as many blue beads. How many beads does she have altogether?", "6 + 2 * 6"),
    ("A class of 28 students goes on a trip. Each van holds 7 students. How many vans are needed?", "28 / 7"),
    ("Dan walked 3 km on Monday, 4 km on Tuesday and 5 km on Wednesday. How far did he walk in total, in km?",
     "3 + 4 + 5"),
    ("The temperature was 8 degrees in the morning and rose by 13 degrees. What was the temperature then?",
     "8 + 13"),
    ("The temperature was 5 degrees and dropped by 9 degrees. What is the temperature now?", "5 - 9"),
    ("A number is doubled and then 6 is added. The start number is 10. What is the result?", "2 * 10 + 6"),
    ("I think of a number, add 7 and get 20. What was my number?", "20 - 7"),
    ("What number plus 15 equals 42?", "42 - 15"),
    ("What number times 6 equals 54?", "54 / 6"),
    ("Find the missing number: 9 + ? = 31.", "31 - 9"),
    ("What is the difference of 83 and 47?", "83 - 47"),
    ("Find the product of 14 and 5.", "14 * 5"),
    ("What is the quotient of 81 and 9?", "81 / 9"),
    ("What is the total of 7, 8 and 15?", "7 + 8 + 15"),
    ("A garden is 12 meters long and 5 meters wide. What is its area in square meters?", "12 * 5"),
    ("A square has sides of 9 cm. What is its perimeter in cm?", "4 * 9"),
    ("A rectangle is 8 cm by 3 cm. What is its perimeter in cm?", "2 * (8 + 3)"),
    ("A bottle holds 2 liters. How many liters do 9 bottles hold?", "2 * 9"),
    ("A jug has 1000 ml of water. 350 ml is poured out. How many ml are left?", "1000 - 350"),
    ("A rope is 3 meters long. How many centimeters is that?", "3 * 100"),
    ("A bag of flour weighs 2 kg. How many grams is that?", "2 * 1000"),
    ("A car travels 60 km each hour. How far does it go in 4 hours, in km?", "60 * 4"),
    ("A cyclist rides 45 km in 3 hours at a steady speed. How many km does she ride each hour?", "45 / 3"),
    ("A school has 18 classes with 25 students each. How many students are in the school?", "18 * 25"),
    ("A stadium has 2,400 seats and 1,750 are filled. How many seats are empty?", "2400 - 1750"),
    ("A factory makes 125 toys a day. How many toys does it make in 8 days?", "125 * 8"),
    ("A box of 144 pencils is split equally among 12 students. How many pencils does each student get?", "144 / 12"),
    ("Add 999 and 1 together.", "999 + 1"),
    ("If you take 10 away from 7, what do you get?", "7 - 10"),
    ("What is negative 4 plus 9?", "-4 + 9"),
    ("A dozen is 12. How many eggs are in 3 dozen?", "3 * 12"),
    ("How many legs do 6 chickens and 2 dogs have altogether?", "6 * 2 + 2 * 4"),
    ("A pizza is cut into 8 slices. Four people each eat 2 slices. How many slices are left?", "8 - 4 * 2"),
    ("There are 5 birds on a fence. 3 more land and then 2 fly away. How many birds are on the fence?", "5 + 3 - 2"),
]


def value(expression: str) -> str:
    """The exact value of an arithmetic expression of integers (+ - * / and parentheses), as an integer string.

    Every integer is read as a `Fraction`, so "/" divides exactly: a float result rounded back to a whole number would
    let 10001 / 10000 through as 1."""
    exact = eval(re.sub(r"\d+", r"Fraction(\g<0>)", expression),  # noqa: S307 - our own literal expressions
                 {"__builtins__": {}, "Fraction": Fraction}, {})
    if exact.denominator != 1:
        raise ValueError(f"{expression!r} is not a whole number ({exact})")
    return str(exact.numerator)


def rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": question}], "answer": value(expression), "domain": "arithmetic",
             "thinking": False} for question, expression in QUESTIONS]


def main() -> int:
    write_jsonl(OUTPUT, rows())
    print(f"wrote {OUTPUT}: {len(QUESTIONS)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
