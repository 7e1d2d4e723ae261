"""Generate the shipped Korean text-to-SQL sample (LLaMA-Factory alpaca format) into ``data/``.

Writes three files, byte-identical on every run:

- ``data/text2sql_ko.json``         about 2,000 training records
- ``data/text2sql_ko_heldout.json`` 50 records whose questions never occur in the training file
- ``data/dataset_info.json``        the LLaMA-Factory registry entries for both (other entries are kept)

A record is ``{"instruction": <Korean instruction + question>, "input": <CREATE TABLE schema>,
"output": "쿼리 작성: SELECT ...;"}``; about 10% also carry a ``system`` prompt and about 5% a ``history`` of
one earlier ``[user, assistant]`` turn, so that every alpaca field is exercised. The ``input`` is valid SQLite
DDL and every ``output`` query runs against it (``tests/test_sample_data.py`` checks both).

Usage::

    python scripts/make_text2sql.py           # regenerate in place
    python scripts/make_text2sql.py --check   # exit 1 if the committed files differ from a fresh generation
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"
TRAIN_FILE = "text2sql_ko.json"
HELDOUT_FILE = "text2sql_ko_heldout.json"
SEED = 20240611
N_TRAIN = 2000
N_HELDOUT = 50
OUTPUT_PREFIX = "쿼리 작성: "
P_SYSTEM = 0.10
P_HISTORY = 0.05
P_FULL_SCHEMA = 0.25  # otherwise only the tables the query touches: short and long records both occur


# ------------------------------------------------------------------------------------------------ schemas
@dataclass(frozen=True)
class Column:
    name: str
    type: str
    comment: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    comment: str
    columns: tuple[Column, ...]

    def ddl(self) -> str:
        """Compact ``CREATE TABLE`` text, one column per line with its Korean comment (valid SQLite).

        No indentation: with the Llama 3 split, leading spaces cost a token per line.
        """
        lines = [f"CREATE TABLE {self.name} ( -- {self.comment}"]
        for i, col in enumerate(self.columns):
            sep = "," if i < len(self.columns) - 1 else ""
            note = f" -- {col.comment}" if col.comment else ""
            lines.append(f"{col.name} {col.type}{sep}{note}")
        lines.append(");")
        return "\n".join(lines)


@dataclass(frozen=True)
class Schema:
    name: str
    tables: tuple[Table, ...]

    def ddl(self, only: tuple[str, ...] = ()) -> str:
        """The schema's DDL; with ``only``, just those tables (kept in schema order)."""
        return "\n".join(t.ddl() for t in self.tables if not only or t.name in only)


def _cols(*specs: str) -> tuple[Column, ...]:
    """``"name TYPE | comment"`` strings -> columns; keeps the schema tables below readable."""
    out = []
    for spec in specs:
        decl, _, comment = spec.partition("|")
        name, _, type_ = decl.strip().partition(" ")
        out.append(Column(name, type_.strip(), comment.strip()))
    return tuple(out)


SCHEMAS: dict[str, Schema] = {
    "hr": Schema("hr", (
        Table("departments", "부서", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 부서명", "location TEXT | 소재 도시",
            "budget INTEGER | 연간 예산(만 원)")),
        Table("employees", "직원", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 이름", "dept_id INTEGER | 소속 부서 번호",
            "position TEXT | 직급", "salary INTEGER | 연봉(만 원)", "hire_date TEXT | 입사일(YYYY-MM-DD)",
            "city TEXT | 거주 도시")),
    )),
    "shop": Schema("shop", (
        Table("customers", "고객", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 고객 이름", "city TEXT | 거주 도시",
            "grade TEXT | 회원 등급", "joined_at TEXT | 가입일")),
        Table("products", "상품", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 상품명", "category TEXT | 분류",
            "price INTEGER | 판매가(원)", "stock INTEGER | 재고 수량")),
        Table("orders", "주문", _cols(
            "id INTEGER PRIMARY KEY", "customer_id INTEGER | 고객 번호", "product_id INTEGER | 상품 번호",
            "quantity INTEGER | 수량", "order_date TEXT | 주문일", "status TEXT | 주문 상태")),
    )),
    "school": Schema("school", (
        Table("students", "학생", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 이름", "major TEXT | 전공", "year_level INTEGER | 학년",
            "admission_year INTEGER | 입학 연도", "gpa REAL | 평점 평균")),
        Table("courses", "과목", _cols(
            "id INTEGER PRIMARY KEY", "title TEXT | 과목명", "professor TEXT | 담당 교수",
            "credits INTEGER | 학점")),
        Table("enrollments", "수강", _cols(
            "student_id INTEGER", "course_id INTEGER", "semester TEXT | 학기(예: 2023-1)",
            "score INTEGER | 점수(0~100)")),
    )),
    "library": Schema("library", (
        Table("books", "도서", _cols(
            "id INTEGER PRIMARY KEY", "title TEXT | 제목", "author TEXT | 저자", "publisher TEXT | 출판사",
            "published_year INTEGER | 출간 연도", "genre TEXT | 장르")),
        Table("members", "회원", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 이름", "city TEXT | 거주 도시", "joined_at TEXT | 가입일")),
        Table("loans", "대출", _cols(
            "id INTEGER PRIMARY KEY", "book_id INTEGER", "member_id INTEGER", "loan_date TEXT | 대출일",
            "return_date TEXT | 반납일(미반납이면 NULL)")),
    )),
    "hospital": Schema("hospital", (
        Table("doctors", "의사", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 이름", "specialty TEXT | 진료과",
            "career_years INTEGER | 경력(년)")),
        Table("patients", "환자", _cols(
            "id INTEGER PRIMARY KEY", "name TEXT | 이름", "birth_year INTEGER | 출생 연도",
            "gender TEXT | 성별(M/F)", "city TEXT | 거주 도시")),
        Table("visits", "진료", _cols(
            "id INTEGER PRIMARY KEY", "patient_id INTEGER", "doctor_id INTEGER", "visit_date TEXT | 진료일",
            "diagnosis TEXT | 진단명", "fee INTEGER | 진료비(원)")),
    )),
    "weather": Schema("weather", (
        Table("weather", "일별 기상 관측", _cols(
            "station TEXT | 관측소", "city TEXT | 도시", "obs_date TEXT | 관측일",
            "temp_avg REAL | 평균 기온(℃)", "rainfall REAL | 강수량(mm)")),
    )),
}


# -------------------------------------------------------------------------------------------- slot values
# One list per slot name. A question writes ``{city}``; a range writes ``{price_lo}`` and ``{price_hi}``,
# which draw two distinct values of ``price`` in increasing order.
SLOTS: dict[str, list[str]] = {
    "city": ["서울", "부산", "대구", "인천", "광주", "대전", "울산", "수원", "제주", "창원", "청주", "전주"],
    "name": ["김민준", "이서연", "박지호", "최수아", "정도윤", "강하은", "조예준", "윤지우", "장서준", "임하윤",
             "한지민", "오승현", "서유진", "신동현", "권나연", "황재원"],
    "surname": ["김", "이", "박", "최", "정", "강", "조", "윤", "장", "임", "한", "오"],
    "year": [str(y) for y in range(2016, 2025)],
    "month": [str(m) for m in range(1, 13)],
    "n": ["3", "5", "10"],
    "k": ["2", "3", "5", "10"],
    # hr
    "dept": ["영업부", "인사부", "개발부", "마케팅부", "재무부", "기획부", "총무부", "연구소"],
    "position": ["사원", "대리", "과장", "차장", "부장"],
    "salary": ["3000", "3500", "4000", "4500", "5000", "6000", "7000", "8000"],
    # shop
    "category": ["전자제품", "의류", "식품", "도서", "가구", "화장품", "스포츠", "완구"],
    "grade": ["일반", "실버", "골드", "VIP"],
    "status": ["결제완료", "배송중", "배송완료", "취소"],
    "price": ["5000", "10000", "20000", "30000", "50000", "100000", "300000"],
    "stock": ["5", "10", "20", "50"],
    "product_kw": ["노트북", "셔츠", "커피", "의자", "운동화", "이어폰", "크림", "블록"],
    # school
    "major": ["컴퓨터공학", "경영학", "수학", "물리학", "국어국문학", "심리학", "화학", "경제학"],
    "year_level": ["1", "2", "3", "4"],
    "gpa": ["3.0", "3.5", "4.0", "4.3"],
    "course": ["데이터베이스", "자료구조", "선형대수", "미시경제학", "일반화학", "한국사", "통계학개론",
               "운영체제", "마케팅원론", "심리학개론"],
    "professor": ["김영수", "이정희", "박성민", "최은정", "정현우", "한미경"],
    "credits": ["1", "2", "3"],
    "semester": ["2022-1", "2022-2", "2023-1", "2023-2", "2024-1"],
    "score": ["50", "60", "70", "80", "90"],
    "name_end": ["준", "연", "호", "아", "윤", "은", "우", "민"],
    # library
    "genre": ["소설", "에세이", "역사", "과학", "자기계발", "시", "만화", "경제"],
    "author": ["한강", "김영하", "정유정", "박완서", "황석영", "신경숙", "김훈", "공지영"],
    "title": ["바다의 기억", "별을 세는 밤", "데이터 과학 입문", "고양이 탐정", "서울의 골목", "작은 숲",
              "파이썬 첫걸음", "여름의 끝", "조선의 왕들", "우주 여행 안내서"],
    "title_kw": ["바다", "별", "서울", "고양이", "여름", "역사", "우주", "사랑"],
    "publisher": ["민음사", "문학동네", "창비", "한빛미디어", "위즈덤하우스", "김영사"],
    "pub_year": ["2000", "2010", "2015", "2018", "2020", "2022"],
    # hospital
    "specialty": ["내과", "외과", "소아과", "정형외과", "피부과", "안과", "이비인후과", "신경과"],
    "doctor": ["김지훈", "이수진", "박준형", "최윤서", "정민호", "강서윤"],
    "diagnosis": ["감기", "고혈압", "당뇨병", "위염", "골절", "아토피 피부염", "결막염", "비염", "편두통", "요통"],
    "birth_year": ["1950", "1960", "1970", "1980", "1990", "2000", "2010"],
    "career": ["5", "10", "15", "20"],
    "fee": ["5000", "10000", "20000", "50000", "100000", "200000"],
    # weather
    "temp": ["-5", "0", "5", "10", "15", "20", "25", "30"],
    "rain": ["10", "20", "30", "50", "80", "100"],
}


# ------------------------------------------------------------------------------------------------ patterns
@dataclass(frozen=True)
class Pattern:
    """Several Korean phrasings of one question shape, and the SQL they all mean."""

    schema: str
    tables: tuple[str, ...]  # the tables the SQL reads: the short schema shows only these
    questions: tuple[str, ...]
    sql: str


def _p(schema: str, tables: str, questions: list[str], sql: str) -> Pattern:
    return Pattern(schema, tuple(tables.split()), tuple(questions), sql)


# ``(이/가)`` style markers after a slot pick the particle that fits the value's last syllable.
PATTERNS: list[Pattern] = [
    # ---- hr
    _p("hr", "employees", [
        "{city}에 사는 직원의 이름을 모두 알려줘.", "거주지가 {city}인 직원들의 이름은?",
        "{city}에 거주하는 직원 목록을 보여 주세요."],
        "SELECT name FROM employees WHERE city = '{city}';"),
    _p("hr", "employees", [
        "직급이 {position}인 직원은 몇 명인가요?", "{position} 직급 직원 수를 세어 줘."],
        "SELECT COUNT(*) FROM employees WHERE position = '{position}';"),
    _p("hr", "employees", [
        "연봉이 {salary}만 원 이상인 직원의 이름과 연봉을 보여줘.",
        "연봉 {salary}만 원 이상 받는 직원은 누구이고 얼마를 받나요?"],
        "SELECT name, salary FROM employees WHERE salary >= {salary};"),
    _p("hr", "employees", [
        "{year}년에 입사한 직원의 이름과 입사일을 입사일 순으로 보여줘.",
        "{year}년 입사자를 입사한 날짜 순서대로 알려 주세요."],
        "SELECT name, hire_date FROM employees WHERE hire_date BETWEEN '{year}-01-01' AND '{year}-12-31' "
        "ORDER BY hire_date;"),
    _p("hr", "employees", [
        "연봉이 가장 높은 직원 {n}명의 이름과 연봉은?", "연봉 상위 {n}명을 보여줘."],
        "SELECT name, salary FROM employees ORDER BY salary DESC LIMIT {n};"),
    _p("hr", "employees", [
        "직급별 평균 연봉을 구해줘.", "각 직급의 평균 연봉은 얼마인가요?", "직급마다 연봉 평균을 알려줘."],
        "SELECT position, AVG(salary) AS avg_salary FROM employees GROUP BY position;"),
    _p("hr", "employees", [
        "성이 {surname}씨인 직원을 모두 찾아줘.", "{surname}씨 성을 가진 직원의 이름과 직급은?"],
        "SELECT name, position FROM employees WHERE name LIKE '{surname}%';"),
    _p("hr", "employees departments", [
        "{dept} 소속 직원의 이름과 직급을 알려줘.", "{dept}에서 일하는 직원은 누구인가요?",
        "{dept} 직원 명단을 보여줘."],
        "SELECT e.name, e.position FROM employees AS e JOIN departments AS d ON e.dept_id = d.id "
        "WHERE d.name = '{dept}';"),
    _p("hr", "employees departments", [
        "부서별 직원 수를 부서명과 함께 보여줘.", "각 부서에는 직원이 몇 명씩 있나요?"],
        "SELECT d.name, COUNT(*) AS headcount FROM employees AS e JOIN departments AS d ON e.dept_id = d.id "
        "GROUP BY d.name;"),
    _p("hr", "employees departments", [
        "직원이 {k}명 이상인 부서의 이름은?", "소속 직원 수가 {k}명 이상인 부서를 알려줘."],
        "SELECT d.name FROM departments AS d JOIN employees AS e ON e.dept_id = d.id GROUP BY d.id, d.name "
        "HAVING COUNT(*) >= {k};"),
    _p("hr", "employees departments", [
        "평균 연봉이 {salary}만 원을 넘는 부서와 그 평균 연봉을 알려줘.",
        "부서 평균 연봉이 {salary}만 원 초과인 부서는?"],
        "SELECT d.name, AVG(e.salary) AS avg_salary FROM employees AS e JOIN departments AS d "
        "ON e.dept_id = d.id GROUP BY d.name HAVING AVG(e.salary) > {salary};"),
    _p("hr", "departments", [
        "{city}에 있는 부서의 이름과 예산을 예산이 큰 순서로 보여줘.", "{city} 소재 부서를 예산 내림차순으로 알려줘."],
        "SELECT name, budget FROM departments WHERE location = '{city}' ORDER BY budget DESC;"),
    _p("hr", "employees", [
        "연봉이 {salary_lo}만 원에서 {salary_hi}만 원 사이인 {position}(은/는) 누구인가요?",
        "{position} 중 연봉이 {salary_lo}만~{salary_hi}만 원인 사람의 이름을 알려줘."],
        "SELECT name FROM employees WHERE position = '{position}' AND salary BETWEEN {salary_lo} AND {salary_hi};"),
    _p("hr", "employees departments", [
        "{dept}의 연봉 총액은 얼마인가요?", "{dept} 직원들의 연봉을 모두 더하면?"],
        "SELECT SUM(e.salary) AS total_salary FROM employees AS e JOIN departments AS d ON e.dept_id = d.id "
        "WHERE d.name = '{dept}';"),
    _p("hr", "employees", [
        "{year}년 이후 입사한 직원 수를 직급별로 알려줘.", "{year}년부터 입사한 사람을 직급마다 세어 줘."],
        "SELECT position, COUNT(*) AS hires FROM employees WHERE hire_date >= '{year}-01-01' GROUP BY position;"),
    _p("hr", "departments", [
        "예산이 가장 많은 부서 {n}곳을 알려줘.", "연간 예산 상위 {n}개 부서의 이름과 예산은?"],
        "SELECT name, budget FROM departments ORDER BY budget DESC LIMIT {n};"),
    _p("hr", "employees departments", [
        "{city}에 있는 부서에서 일하는 {position}의 이름을 알려줘."],
        "SELECT e.name FROM employees AS e JOIN departments AS d ON e.dept_id = d.id "
        "WHERE d.location = '{city}' AND e.position = '{position}';"),
    # ---- shop
    _p("shop", "products", [
        "{category} 분류 상품의 이름과 가격을 가격이 낮은 순으로 보여줘.", "{category} 상품을 싼 것부터 알려줘."],
        "SELECT name, price FROM products WHERE category = '{category}' ORDER BY price;"),
    _p("shop", "products", [
        "가격이 {price_lo}원에서 {price_hi}원 사이인 상품은?", "{price_lo}원 이상 {price_hi}원 이하 상품의 이름을 알려줘."],
        "SELECT name FROM products WHERE price BETWEEN {price_lo} AND {price_hi};"),
    _p("shop", "products", [
        "재고가 {stock}개 미만인 상품 이름과 재고를 알려줘.", "재고 수량이 {stock}개보다 적은 상품은?"],
        "SELECT name, stock FROM products WHERE stock < {stock};"),
    _p("shop", "products", [
        "분류별 상품 수와 평균 가격을 구해줘.", "카테고리마다 상품이 몇 개이고 평균 가격은 얼마인가요?"],
        "SELECT category, COUNT(*) AS n_products, AVG(price) AS avg_price FROM products GROUP BY category;"),
    _p("shop", "customers", [
        "회원 등급이 {grade}인 고객은 몇 명이야?", "{grade} 등급 고객 수를 알려줘."],
        "SELECT COUNT(*) FROM customers WHERE grade = '{grade}';"),
    _p("shop", "customers", [
        "{city}에 사는 {grade} 등급 고객의 이름을 알려줘.", "{city} 거주 {grade} 회원은 누구인가요?"],
        "SELECT name FROM customers WHERE city = '{city}' AND grade = '{grade}';"),
    _p("shop", "customers", [
        "{year}년에 가입한 고객 수는?", "{year}년 신규 가입 고객은 몇 명인가요?"],
        "SELECT COUNT(*) FROM customers WHERE strftime('%Y', joined_at) = '{year}';"),
    _p("shop", "products", [
        "상품명에 '{product_kw}'(이/가) 들어간 상품을 찾아줘.", "이름에 '{product_kw}'(이/가) 포함된 상품과 가격은?"],
        "SELECT name, price FROM products WHERE name LIKE '%{product_kw}%';"),
    _p("shop", "orders customers products", [
        "{name} 고객이 주문한 상품명을 모두 알려줘.", "{name} 님이 산 상품의 이름은?"],
        "SELECT p.name FROM orders AS o JOIN customers AS c ON o.customer_id = c.id "
        "JOIN products AS p ON o.product_id = p.id WHERE c.name = '{name}';"),
    _p("shop", "orders", [
        "{year}년 {month}월 주문 건수는?", "{year}년 {month}월에 들어온 주문은 몇 건이야?"],
        "SELECT COUNT(*) FROM orders WHERE strftime('%Y-%m', order_date) = '{year}-{month:0>2}';"),
    _p("shop", "customers", [
        "도시별 고객 수를 많은 순으로 보여줘.", "고객이 많은 도시부터 고객 수를 알려줘."],
        "SELECT city, COUNT(*) AS n_customers FROM customers GROUP BY city ORDER BY n_customers DESC;"),
    _p("shop", "orders products", [
        "분류별 총 매출액(가격×수량)을 구해줘.", "상품 분류마다 매출 합계를 알려줘."],
        "SELECT p.category, SUM(p.price * o.quantity) AS revenue FROM orders AS o "
        "JOIN products AS p ON o.product_id = p.id GROUP BY p.category;"),
    _p("shop", "orders customers", [
        "주문을 {k}건 이상 한 고객의 이름과 주문 건수는?", "{k}번 이상 주문한 고객을 알려줘."],
        "SELECT c.name, COUNT(*) AS n_orders FROM orders AS o JOIN customers AS c ON o.customer_id = c.id "
        "GROUP BY c.id, c.name HAVING COUNT(*) >= {k};"),
    _p("shop", "orders products", [
        "가장 많이 팔린 상품 {n}개를 판매 수량과 함께 알려줘.", "판매 수량 상위 {n}개 상품은?"],
        "SELECT p.name, SUM(o.quantity) AS sold FROM orders AS o JOIN products AS p ON o.product_id = p.id "
        "GROUP BY p.id, p.name ORDER BY sold DESC LIMIT {n};"),
    _p("shop", "orders", [
        "주문 상태가 {status}인 주문은 몇 건인가요?", "{status} 상태의 주문 수를 알려줘."],
        "SELECT COUNT(*) FROM orders WHERE status = '{status}';"),
    _p("shop", "orders customers products", [
        "{city} 고객들의 {year}년 총 구매 금액은?", "{year}년에 {city}에 사는 고객이 쓴 금액의 합계를 구해줘."],
        "SELECT SUM(p.price * o.quantity) AS total FROM orders AS o JOIN customers AS c ON o.customer_id = c.id "
        "JOIN products AS p ON o.product_id = p.id "
        "WHERE c.city = '{city}' AND o.order_date BETWEEN '{year}-01-01' AND '{year}-12-31';"),
    _p("shop", "orders products", [
        "'{category}' 분류 상품 중 {status} 상태인 주문의 번호와 상품명을 보여줘."],
        "SELECT o.id, p.name FROM orders AS o JOIN products AS p ON o.product_id = p.id "
        "WHERE p.category = '{category}' AND o.status = '{status}';"),
    # ---- school
    _p("school", "students", [
        "{major} 전공 학생의 이름을 알려줘.", "전공이 {major}인 학생은 누구인가요?"],
        "SELECT name FROM students WHERE major = '{major}';"),
    _p("school", "students", [
        "{year_level}학년 학생 수는 몇 명인가요?", "{year_level}학년은 모두 몇 명이야?"],
        "SELECT COUNT(*) FROM students WHERE year_level = {year_level};"),
    _p("school", "students", [
        "평점이 {gpa} 이상인 학생을 평점이 높은 순으로 보여줘.", "평점 평균 {gpa} 이상인 학생의 이름과 평점을 내림차순으로."],
        "SELECT name, gpa FROM students WHERE gpa >= {gpa} ORDER BY gpa DESC;"),
    _p("school", "students", [
        "전공별 평균 평점을 구해줘.", "각 전공의 평점 평균은 얼마인가요?"],
        "SELECT major, AVG(gpa) AS avg_gpa FROM students GROUP BY major;"),
    _p("school", "students", [
        "{year}년에 입학한 {major} 전공 학생은?", "{major} 전공 {year}학번 학생의 이름을 알려줘."],
        "SELECT name FROM students WHERE admission_year = {year} AND major = '{major}';"),
    _p("school", "courses", [
        "{professor} 교수가 담당하는 과목명과 학점을 알려줘.", "{professor} 교수님 강의 목록을 보여줘."],
        "SELECT title, credits FROM courses WHERE professor = '{professor}';"),
    _p("school", "courses", [
        "{credits}학점짜리 과목은 몇 개야?", "학점이 {credits}인 과목 수를 알려줘."],
        "SELECT COUNT(*) FROM courses WHERE credits = {credits};"),
    _p("school", "students enrollments courses", [
        "'{course}' 과목을 수강한 학생 이름을 알려줘.", "{course} 수업을 들은 학생은 누구인가요?"],
        "SELECT s.name FROM enrollments AS en JOIN students AS s ON en.student_id = s.id "
        "JOIN courses AS c ON en.course_id = c.id WHERE c.title = '{course}';"),
    _p("school", "enrollments courses", [
        "과목별 평균 점수를 과목명과 함께 보여줘.", "각 과목의 평균 점수를 알려줘."],
        "SELECT c.title, AVG(en.score) AS avg_score FROM enrollments AS en JOIN courses AS c "
        "ON en.course_id = c.id GROUP BY c.id, c.title;"),
    _p("school", "enrollments courses", [
        "수강생이 {k}명 이상인 과목은?", "{k}명 이상이 수강한 과목의 이름과 수강생 수를 알려줘."],
        "SELECT c.title, COUNT(*) AS n_students FROM enrollments AS en JOIN courses AS c ON en.course_id = c.id "
        "GROUP BY c.id, c.title HAVING COUNT(*) >= {k};"),
    _p("school", "students enrollments courses", [
        "{semester} 학기에 {name} 학생이 받은 점수를 과목별로 보여줘.", "{name} 학생의 {semester} 학기 성적은?"],
        "SELECT c.title, en.score FROM enrollments AS en JOIN students AS s ON en.student_id = s.id "
        "JOIN courses AS c ON en.course_id = c.id WHERE s.name = '{name}' AND en.semester = '{semester}';"),
    _p("school", "students enrollments courses", [
        "'{course}' 과목에서 점수가 가장 높은 학생 {n}명은?", "{course} 점수 상위 {n}명의 이름과 점수를 알려줘."],
        "SELECT s.name, en.score FROM enrollments AS en JOIN students AS s ON en.student_id = s.id "
        "JOIN courses AS c ON en.course_id = c.id WHERE c.title = '{course}' ORDER BY en.score DESC LIMIT {n};"),
    _p("school", "enrollments", [
        "점수가 {score_lo}점에서 {score_hi}점 사이인 수강 기록은 몇 건인가요?",
        "{score_lo}점 이상 {score_hi}점 이하를 받은 수강 건수는?"],
        "SELECT COUNT(*) FROM enrollments WHERE score BETWEEN {score_lo} AND {score_hi};"),
    _p("school", "students", [
        "이름이 '{name_end}'(으로/로) 끝나는 학생을 찾아줘.", "이름 마지막 글자가 '{name_end}'인 학생의 이름과 전공은?"],
        "SELECT name, major FROM students WHERE name LIKE '%{name_end}';"),
    _p("school", "students enrollments courses", [
        "학생별 총 수강 학점을 구해줘.", "학생마다 들은 과목의 학점 합계를 알려줘."],
        "SELECT s.name, SUM(c.credits) AS total_credits FROM enrollments AS en JOIN students AS s "
        "ON en.student_id = s.id JOIN courses AS c ON en.course_id = c.id GROUP BY s.id, s.name;"),
    _p("school", "students enrollments", [
        "{semester} 학기 평균 점수가 {score}점 이상인 학생은?"],
        "SELECT s.name, AVG(en.score) AS avg_score FROM enrollments AS en JOIN students AS s "
        "ON en.student_id = s.id WHERE en.semester = '{semester}' GROUP BY s.id, s.name "
        "HAVING AVG(en.score) >= {score};"),
    # ---- library
    _p("library", "books", [
        "{genre} 장르 도서의 제목과 저자를 알려줘.", "장르가 {genre}인 책을 보여줘."],
        "SELECT title, author FROM books WHERE genre = '{genre}';"),
    _p("library", "books", [
        "{author} 작가가 쓴 책은 몇 권인가요?", "저자가 {author}인 도서 수를 알려줘."],
        "SELECT COUNT(*) FROM books WHERE author = '{author}';"),
    _p("library", "books", [
        "{pub_year}년 이후 출간된 도서를 출간 연도 순으로 보여줘.", "{pub_year}년부터 나온 책의 제목과 출간 연도를 오래된 순으로."],
        "SELECT title, published_year FROM books WHERE published_year >= {pub_year} ORDER BY published_year;"),
    _p("library", "books", [
        "제목에 '{title_kw}'(이/가) 들어가는 책을 찾아줘.", "'{title_kw}'(이/가) 제목에 포함된 도서의 제목과 저자는?"],
        "SELECT title, author FROM books WHERE title LIKE '%{title_kw}%';"),
    _p("library", "books", [
        "출판사별 도서 수를 많은 순으로 {n}곳 보여줘.", "책이 가장 많은 출판사 {n}곳과 그 권수를 알려줘."],
        "SELECT publisher, COUNT(*) AS n_books FROM books GROUP BY publisher ORDER BY n_books DESC LIMIT {n};"),
    _p("library", "loans", [
        "아직 반납되지 않은 대출 건수는?", "미반납 대출은 몇 건이야?"],
        "SELECT COUNT(*) FROM loans WHERE return_date IS NULL;"),
    _p("library", "loans members books", [
        "{name} 회원이 빌린 책의 제목을 알려줘.", "{name} 님의 대출 도서 목록을 보여줘."],
        "SELECT b.title FROM loans AS l JOIN members AS m ON l.member_id = m.id "
        "JOIN books AS b ON l.book_id = b.id WHERE m.name = '{name}';"),
    _p("library", "loans books", [
        "{year}년 {month}월에 대출된 책 제목을 모두 보여줘.", "{year}년 {month}월 대출 도서의 제목은?"],
        "SELECT b.title FROM loans AS l JOIN books AS b ON l.book_id = b.id "
        "WHERE strftime('%Y-%m', l.loan_date) = '{year}-{month:0>2}';"),
    _p("library", "loans books", [
        "가장 많이 대출된 책 {n}권의 제목과 대출 횟수는?", "대출 횟수 상위 {n}권을 알려줘."],
        "SELECT b.title, COUNT(*) AS n_loans FROM loans AS l JOIN books AS b ON l.book_id = b.id "
        "GROUP BY b.id, b.title ORDER BY n_loans DESC LIMIT {n};"),
    _p("library", "loans members", [
        "대출을 {k}번 이상 한 회원의 이름은?", "{k}권 이상 빌린 회원과 대출 횟수를 알려줘."],
        "SELECT m.name, COUNT(*) AS n_loans FROM loans AS l JOIN members AS m ON l.member_id = m.id "
        "GROUP BY m.id, m.name HAVING COUNT(*) >= {k};"),
    _p("library", "members", [
        "{city}에 사는 회원 수는?", "{city} 거주 회원은 몇 명인가요?"],
        "SELECT COUNT(*) FROM members WHERE city = '{city}';"),
    _p("library", "books", [
        "장르별 도서 수를 구해줘.", "각 장르에 책이 몇 권씩 있나요?"],
        "SELECT genre, COUNT(*) AS n_books FROM books GROUP BY genre;"),
    _p("library", "loans members books", [
        "'{title}'(을/를) 빌려 간 회원의 이름과 대출일을 알려줘.", "『{title}』 대출 기록을 회원 이름과 함께 보여줘."],
        "SELECT m.name, l.loan_date FROM loans AS l JOIN members AS m ON l.member_id = m.id "
        "JOIN books AS b ON l.book_id = b.id WHERE b.title = '{title}';"),
    _p("library", "loans books", [
        "{author} 작가 책 가운데 아직 반납되지 않은 대출 기록을 보여줘.", "반납이 안 된 {author} 작가 도서의 대출 번호와 제목은?"],
        "SELECT l.id, b.title FROM loans AS l JOIN books AS b ON l.book_id = b.id "
        "WHERE b.author = '{author}' AND l.return_date IS NULL;"),
    _p("library", "members", [
        "{year}년에 가입한 회원 가운데 {city}에 사는 사람은?", "{city} 거주 회원 중 {year}년 가입자의 이름을 알려줘."],
        "SELECT name FROM members WHERE city = '{city}' AND joined_at BETWEEN '{year}-01-01' AND '{year}-12-31';"),
    _p("library", "books", [
        "{publisher}에서 {pub_year_lo}년부터 {pub_year_hi}년 사이에 낸 책은?"],
        "SELECT title FROM books WHERE publisher = '{publisher}' "
        "AND published_year BETWEEN {pub_year_lo} AND {pub_year_hi};"),
    # ---- hospital
    _p("hospital", "doctors", [
        "{specialty} 소속 의사의 이름을 알려줘.", "진료과가 {specialty}인 의사는 누구인가요?"],
        "SELECT name FROM doctors WHERE specialty = '{specialty}';"),
    _p("hospital", "doctors", [
        "경력이 {career}년 이상인 의사를 경력 순으로 보여줘.", "경력 {career}년 이상 의사의 이름과 경력을 많은 순으로."],
        "SELECT name, career_years FROM doctors WHERE career_years >= {career} ORDER BY career_years DESC;"),
    _p("hospital", "patients", [
        "{birth_year}년 이전에 태어난 환자 수는?", "출생 연도가 {birth_year}년보다 앞선 환자는 몇 명이야?"],
        "SELECT COUNT(*) FROM patients WHERE birth_year < {birth_year};"),
    _p("hospital", "patients", [
        "{city}에 사는 여성 환자의 이름을 알려줘.", "{city} 거주 여자 환자는 누구인가요?"],
        "SELECT name FROM patients WHERE city = '{city}' AND gender = 'F';"),
    _p("hospital", "patients", [
        "{city}에 사는 남성 환자 수는?", "{city} 거주 남자 환자는 몇 명인가요?"],
        "SELECT COUNT(*) FROM patients WHERE city = '{city}' AND gender = 'M';"),
    _p("hospital", "visits", [
        "진단명이 '{diagnosis}'인 진료 기록 수는?", "{diagnosis} 진단을 받은 진료는 몇 건인가요?"],
        "SELECT COUNT(*) FROM visits WHERE diagnosis = '{diagnosis}';"),
    _p("hospital", "doctors", [
        "진료과별 의사 수를 구해줘.", "진료과마다 의사가 몇 명 있나요?"],
        "SELECT specialty, COUNT(*) AS n_doctors FROM doctors GROUP BY specialty;"),
    _p("hospital", "visits patients doctors", [
        "{name} 환자를 진료한 의사의 이름과 진료일을 알려줘.", "{name} 환자의 진료 기록을 담당 의사와 함께 보여줘."],
        "SELECT d.name, v.visit_date FROM visits AS v JOIN patients AS p ON v.patient_id = p.id "
        "JOIN doctors AS d ON v.doctor_id = d.id WHERE p.name = '{name}';"),
    _p("hospital", "visits doctors", [
        "{doctor} 의사의 {year}년 진료 건수는?", "{year}년에 {doctor} 선생님이 본 진료는 몇 건이야?"],
        "SELECT COUNT(*) FROM visits AS v JOIN doctors AS d ON v.doctor_id = d.id "
        "WHERE d.name = '{doctor}' AND strftime('%Y', v.visit_date) = '{year}';"),
    _p("hospital", "visits patients", [
        "진료비 총액이 가장 많은 환자 {n}명은?", "진료비를 가장 많이 낸 환자 {n}명과 그 금액을 알려줘."],
        "SELECT p.name, SUM(v.fee) AS total_fee FROM visits AS v JOIN patients AS p ON v.patient_id = p.id "
        "GROUP BY p.id, p.name ORDER BY total_fee DESC LIMIT {n};"),
    _p("hospital", "visits patients", [
        "진료를 {k}번 이상 받은 환자의 이름과 횟수는?", "{k}회 이상 방문한 환자를 알려줘."],
        "SELECT p.name, COUNT(*) AS n_visits FROM visits AS v JOIN patients AS p ON v.patient_id = p.id "
        "GROUP BY p.id, p.name HAVING COUNT(*) >= {k};"),
    _p("hospital", "visits doctors", [
        "진료과별 평균 진료비를 높은 순으로 보여줘.", "평균 진료비가 비싼 진료과부터 알려줘."],
        "SELECT d.specialty, AVG(v.fee) AS avg_fee FROM visits AS v JOIN doctors AS d ON v.doctor_id = d.id "
        "GROUP BY d.specialty ORDER BY avg_fee DESC;"),
    _p("hospital", "visits", [
        "진료비가 {fee_lo}원에서 {fee_hi}원 사이인 진료 기록을 보여줘.", "{fee_lo}원 이상 {fee_hi}원 이하 진료의 날짜와 진단명은?"],
        "SELECT visit_date, diagnosis, fee FROM visits WHERE fee BETWEEN {fee_lo} AND {fee_hi};"),
    _p("hospital", "visits patients", [
        "{year}년 {month}월에 '{diagnosis}' 진단을 받은 환자 이름은?", "{year}년 {month}월 {diagnosis} 환자 명단을 보여줘."],
        "SELECT p.name FROM visits AS v JOIN patients AS p ON v.patient_id = p.id WHERE v.diagnosis = '{diagnosis}' "
        "AND strftime('%Y-%m', v.visit_date) = '{year}-{month:0>2}';"),
    _p("hospital", "patients", [
        "성이 {surname}씨인 환자를 찾아줘.", "{surname}씨 환자의 이름과 출생 연도를 알려줘."],
        "SELECT name, birth_year FROM patients WHERE name LIKE '{surname}%';"),
    _p("hospital", "visits patients", [
        "{city} 거주 환자의 진료비 합계는?", "{city}에 사는 환자들이 낸 진료비를 모두 더하면?"],
        "SELECT SUM(v.fee) AS total_fee FROM visits AS v JOIN patients AS p ON v.patient_id = p.id "
        "WHERE p.city = '{city}';"),
    _p("hospital", "visits doctors", [
        "{specialty}에서 가장 흔한 진단명 {n}개는?"],
        "SELECT v.diagnosis, COUNT(*) AS n_visits FROM visits AS v JOIN doctors AS d ON v.doctor_id = d.id "
        "WHERE d.specialty = '{specialty}' GROUP BY v.diagnosis ORDER BY n_visits DESC LIMIT {n};"),
    # ---- weather
    _p("weather", "weather", [
        "{city}의 {year}년 평균 기온은?", "{year}년 {city} 평균 기온을 구해줘."],
        "SELECT AVG(temp_avg) FROM weather WHERE city = '{city}' AND strftime('%Y', obs_date) = '{year}';"),
    _p("weather", "weather", [
        "{city}에서 강수량이 {rain}mm를 넘은 날짜를 알려줘.", "{city}에 비가 {rain}mm 넘게 온 날은?"],
        "SELECT obs_date, rainfall FROM weather WHERE city = '{city}' AND rainfall > {rain};"),
    _p("weather", "weather", [
        "도시별 최고 평균 기온을 구해줘.", "도시마다 가장 더웠던 날의 평균 기온은?"],
        "SELECT city, MAX(temp_avg) AS max_temp FROM weather GROUP BY city;"),
    _p("weather", "weather", [
        "{year}년 {month}월 {city}에서 가장 더웠던 날 {n}일은?", "{city}의 {year}년 {month}월 기온 상위 {n}일을 알려줘."],
        "SELECT obs_date, temp_avg FROM weather WHERE city = '{city}' "
        "AND strftime('%Y-%m', obs_date) = '{year}-{month:0>2}' ORDER BY temp_avg DESC LIMIT {n};"),
    _p("weather", "weather", [
        "{year}년 강수량 합계가 가장 많은 도시는?", "{year}년에 비가 제일 많이 온 도시를 알려줘."],
        "SELECT city, SUM(rainfall) AS total_rain FROM weather WHERE strftime('%Y', obs_date) = '{year}' "
        "GROUP BY city ORDER BY total_rain DESC LIMIT 1;"),
    _p("weather", "weather", [
        "{city}에서 평균 기온이 {temp_lo}도에서 {temp_hi}도 사이인 날은 며칠인가요?",
        "{city}의 평균 기온이 {temp_lo}~{temp_hi}도였던 날 수는?"],
        "SELECT COUNT(*) FROM weather WHERE city = '{city}' AND temp_avg BETWEEN {temp_lo} AND {temp_hi};"),
    _p("weather", "weather", [
        "{city}에서 {year}년에 비가 오지 않은 날은 며칠이야?", "{year}년 {city}의 강수량 0mm인 날 수는?"],
        "SELECT COUNT(*) FROM weather WHERE city = '{city}' AND rainfall = 0 "
        "AND strftime('%Y', obs_date) = '{year}';"),
    _p("weather", "weather", [
        "일평균 강수량이 {rain}mm 이상인 도시는?", "하루 평균 강수량이 {rain}mm를 넘는 도시를 알려줘."],
        "SELECT city, AVG(rainfall) AS avg_rain FROM weather GROUP BY city HAVING AVG(rainfall) >= {rain};"),
    _p("weather", "weather", [
        "관측소 이름에 '{city}'(이/가) 들어가는 관측소 목록을 보여줘."],
        "SELECT DISTINCT station FROM weather WHERE station LIKE '%{city}%';"),
    _p("weather", "weather", [
        "{city}의 평균 기온이 {temp}도 미만인 날짜를 최근 순으로 보여줘."],
        "SELECT obs_date, temp_avg FROM weather WHERE city = '{city}' AND temp_avg < {temp} ORDER BY obs_date DESC;"),
]

INSTRUCTIONS = [
    "다음 스키마를 보고 질문에 맞는 SQL 쿼리를 작성하세요.",
    "아래 테이블 정의를 참고하여 질문에 답하는 SQL 쿼리를 작성하세요.",
    "주어진 데이터베이스 스키마로 다음 질문을 SQLite 쿼리로 바꾸세요.",
    "스키마를 참고해 질문에 해당하는 SQL을 작성해 주세요.",
]
SYSTEMS = [
    "당신은 SQLite 전문가입니다. 질문에 맞는 쿼리만 답하세요.",
    "당신은 한국어 질문을 SQL로 바꿔 주는 데이터 분석 도우미입니다.",
    "You are a helpful assistant that writes SQLite queries.",
]


# ------------------------------------------------------------------------------------------------- Korean
_JOSA = re.compile(r"\((이/가|은/는|을/를|과/와|으로/로)\)")
_DIGIT_BATCHIM = {"0": 21, "1": 8, "3": 16, "6": 1, "7": 8, "8": 8}  # 영 일 삼 육 칠 팔: final consonant index


def _final_consonant(text: str) -> int:
    """Index of the final consonant (받침) of the last readable character: 0 none, 8 ㄹ."""
    stripped = text.rstrip("'\"』)")
    if not stripped:
        return 0
    ch = stripped[-1]
    if "가" <= ch <= "힣":
        return (ord(ch) - ord("가")) % 28
    return _DIGIT_BATCHIM.get(ch, 0)


def attach_josa(text: str) -> str:
    """Replace ``(이/가)``-style markers with the particle that fits the preceding word."""
    def pick(m: re.Match[str]) -> str:
        with_final, without_final = m.group(1).split("/")
        final = _final_consonant(m.string[:m.start()])
        if with_final == "으로":  # ㄹ-final words take 로 too (서울로, 길로)
            return with_final if final not in (0, 8) else without_final
        return with_final if final else without_final
    return _JOSA.sub(pick, text)


# ------------------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class Example:
    """One question and its SQL, before it is rendered as a record."""

    schema: str
    tables: tuple[str, ...]
    question: str
    sql: str


_FIELD = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def sample_example(pattern: Pattern, rng: random.Random) -> Example:
    """Fill one phrasing of ``pattern`` with slot values; the SQL gets the same values."""
    question = rng.choice(pattern.questions)
    values: dict[str, str] = {}
    for name in sorted(set(_FIELD.findall(question + pattern.sql))):
        if name in values:
            continue
        base, _, side = name.rpartition("_")
        if side in ("lo", "hi") and base in SLOTS:
            # Ranges compare as numbers: sort numerically so that BETWEEN lo AND hi is never empty.
            lo, hi = sorted(rng.sample(SLOTS[base], 2), key=float)
            values[f"{base}_lo"], values[f"{base}_hi"] = lo, hi
        else:
            values[name] = rng.choice(SLOTS[name])
    return Example(pattern.schema, pattern.tables, attach_josa(question.format(**values)),
                   pattern.sql.format(**values))


def sample_examples(rng: random.Random, count: int) -> list[Example]:
    """``count`` examples with pairwise distinct questions, spread evenly over the schemas."""
    by_schema: dict[str, list[Pattern]] = {}
    for p in PATTERNS:
        by_schema.setdefault(p.schema, []).append(p)
    schemas = sorted(by_schema)
    seen: dict[str, Example] = {}
    for i, schema in enumerate(schemas):
        # Equal quotas: schemas whose patterns have few slot values would otherwise lose out to the others,
        # because a repeated question is drawn again rather than kept.
        quota = count // len(schemas) + (i < count % len(schemas))
        kept = attempts = 0
        while kept < quota:
            attempts += 1
            if attempts > 100 * quota:
                raise RuntimeError(f"schema {schema!r}: only {kept} distinct questions after {attempts} draws; "
                                   f"add slot values or patterns, or lower the count")
            ex = sample_example(rng.choice(by_schema[schema]), rng)
            if ex.question not in seen:
                seen[ex.question] = ex
                kept += 1
    examples = list(seen.values())
    rng.shuffle(examples)  # the files should not be grouped by schema
    return examples


def render(ex: Example, rng: random.Random, history_pool: list[Example] | None) -> dict:
    """An alpaca record for ``ex``; with a ``history_pool``, some records get a system prompt or history."""
    schema = SCHEMAS[ex.schema]
    tables = ex.tables
    history: list[list[str]] = []
    if history_pool is not None and rng.random() < P_HISTORY:
        earlier = rng.choice([e for e in history_pool if e.schema == ex.schema and e.question != ex.question])
        history = [[f"{rng.choice(INSTRUCTIONS)}\n질문: {earlier.question}", OUTPUT_PREFIX + earlier.sql]]
        tables += earlier.tables  # the schema comes with the last turn, so it must cover the earlier one too
    full = rng.random() < P_FULL_SCHEMA
    record = {
        "instruction": f"{rng.choice(INSTRUCTIONS)}\n질문: {ex.question}",
        "input": schema.ddl() if full else schema.ddl(tables),
        "output": OUTPUT_PREFIX + ex.sql,
    }
    if history_pool is not None and rng.random() < P_SYSTEM:
        record["system"] = rng.choice(SYSTEMS)
    if history:
        record["history"] = history
    return record


def build() -> dict[str, str]:
    """File name -> exact file content, for every file this script owns."""
    rng = random.Random(SEED)
    examples = sample_examples(rng, N_TRAIN + N_HELDOUT)
    # Held-out questions: the first few drawn per schema, so that every schema is asked about.
    per_schema = -(-N_HELDOUT // len(SCHEMAS))
    heldout: list[Example] = []
    counts: dict[str, int] = {}
    for ex in examples:
        if len(heldout) < N_HELDOUT and counts.get(ex.schema, 0) < per_schema:
            heldout.append(ex)
            counts[ex.schema] = counts.get(ex.schema, 0) + 1
    held = {ex.question for ex in heldout}
    train = [ex for ex in examples if ex.question not in held]
    train_records = [render(ex, rng, train) for ex in train]
    heldout_records = [render(ex, rng, None) for ex in heldout]
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"}
    # Other scripts' entries (scripts/make_rag_ko.py) stay in the registry.
    registry = DATA_DIR / "dataset_info.json"
    info = json.loads(registry.read_text(encoding="utf-8")) if registry.is_file() else {}
    info.update({
        "text2sql_ko": {"file_name": TRAIN_FILE, "columns": columns},
        "text2sql_ko_heldout": {"file_name": HELDOUT_FILE, "columns": columns},
    })
    return {TRAIN_FILE: dump(train_records), HELDOUT_FILE: dump(heldout_records), "dataset_info.json": dump(info)}


def dump(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write_or_check(files: dict[str, str], script: str, description: str, argv: list[str] | None = None) -> int:
    """The CLI of a data generator: write ``files`` into data/, or with --check compare them with it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and exit 1 if any file in data/ differs")
    args = parser.parse_args(argv)
    if args.check:
        stale = [name for name, text in files.items()
                 if not (DATA_DIR / name).is_file() or (DATA_DIR / name).read_bytes() != text.encode("utf-8")]
        if stale:
            print(f"out of date in {DATA_DIR}: {', '.join(stale)}; run `python scripts/{script}`", file=sys.stderr)
            return 1
        print(f"{DATA_DIR}: up to date")
        return 0
    DATA_DIR.mkdir(exist_ok=True)
    for name, text in files.items():
        (DATA_DIR / name).write_bytes(text.encode("utf-8"))
    print(f"wrote {', '.join(files)} to {DATA_DIR}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return write_or_check(build(), "make_text2sql.py", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
