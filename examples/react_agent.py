"""A ReAct-style agent loop with a local Python tool (a calculator).

Each step the model writes a thought, then chooses an action with `select` (calculator or
finish). A calculator call's expression is generated under a regex so it is always something
the tool accepts; the tool runs locally and its result goes back as an observation. Every step
extends the same conversation, so each request finds all earlier steps in the radix cache.

    python examples/react_agent.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import ast
import operator
import sys

from radixserve.lang import Endpoint, Runtime, function, gen, select, system, user

QUESTION = "A shop sells pens at 3 dollars each. How much do 17 pens and a 12 dollar notebook cost?"

SYSTEM = """You are an assistant that can use a calculator.
Answer in steps. Each step has a thought, then one action:
  calculator[<arithmetic expression>]  to compute something, or
  finish[<final answer>]               when you know the answer.

Example:
Thought: I need 4 times 5.
Action: calculator[4*5]
Observation: 20
Thought: I know the answer.
Action: finish[20]"""

_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def calculator(expression: str) -> str:
    """Evaluate +, -, *, /, //, %, ** over numbers (no names, no calls); errors as text."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only arithmetic on numbers is allowed")

    try:
        value = ev(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@function
def react(s, question, max_steps, max_tokens):
    s += system(SYSTEM)
    s += user(question)
    trace = []
    for _ in range(max_steps):
        with s.assistant():
            s += "Thought:" + gen("thought", max_tokens=max_tokens, stop="\n") + "\nAction:"
            # The space belongs to the choices: " calculator" is one natural token sequence.
            s += select("action", choices=[" calculator", " finish"])
            action = s["action"].strip()
            if action == "calculator":
                s += "[" + gen("arg", regex=r"[0-9(][0-9+\-*/(). ]{0,30}", max_tokens=max_tokens) + "]"
            else:
                s += "[" + gen("arg", max_tokens=max_tokens, stop="]") + "]"
        step = {"thought": s["thought"].strip(), "action": action, "arg": s["arg"]}
        if action == "finish":
            trace.append(step)
            return {"answer": s["arg"].strip(), "steps": trace}
        step["observation"] = calculator(s["arg"])
        trace.append(step)
        s += user(f"Observation: {step['observation']}")
    # Out of steps: the last observation is the best answer we have.
    return {"answer": trace[-1].get("observation", "") if trace else "", "steps": trace}


def main(backend=None, max_steps: int = 4, max_tokens: int = 32, question: str = QUESTION, out=sys.stdout) -> dict:
    """Run the agent; print its steps; return {"answer", "steps"}."""
    own = backend is None
    backend = backend or Runtime(model="default")
    try:
        state = react.run(question=question, max_steps=max_steps, max_tokens=max_tokens,
                          backend=backend, sampling={"temperature": 0})
        result = state.return_value
        for i, step in enumerate(result["steps"]):
            print(f"step {i}: thought={step['thought']!r} action={step['action']}[{step['arg']}]"
                  + (f" -> {step['observation']}" if "observation" in step else ""), file=out)
        print(f"answer: {result['answer']}", file=out)
        return result
    finally:
        if own:
            backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a radixserve server (default: an in-process engine)")
    parser.add_argument("--max-steps", type=int, default=4)
    args = parser.parse_args()
    main(Endpoint(args.url) if args.url else None, args.max_steps)
